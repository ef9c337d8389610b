"""Training-only augmentation: a seeded random affine warp of each training image, inside tf.data.

Koch et al. (2015, Siamese nets on Omniglot) trained on affine distortions of each character: a small
rotation, shear, zoom and shift keeps the identity while showing the model drawings it has not seen. Here:

- Each image gets its own affine map `A = R(rotation) . Shear(shear) . diag(flip * zoom, zoom)` about the
  image centre, then a shift; its parameters are drawn uniformly in the configured ranges with
  `tf.random.stateless_uniform` under a key folded from (seed, epoch, batch index). A batch is therefore a
  pure function of (seed, epoch, batch index): a resumed run sees exactly the batches (augmentation
  included) of an uninterrupted one.
- The warp is `ImageProjectiveTransformV3` (bilinear), a plain CPU kernel in the tf.data map: deterministic.
  With every range 0 the map is the identity matrix, which reads every pixel exactly (bit-exact); the
  trainer skips the map altogether then.
- Pixels brought in from outside the image: `nearest` (default) repeats the edge pixel, which is the
  background for centred data (white paper for Omniglot, a face crop's surroundings for faces); `reflect` /
  `wrap` are the other edge modes; a number 0..255 fills with that raw pixel value, mapped through the same
  mean/std normalisation the inputs went through (255 -> +1 with mean 0.5 / std 0.5), because inputs reach
  tf.data already preprocessed.
- Horizontal flip is an option, off by default: a mirrored character (or face) can be another identity.

Evaluation, embedding extraction, calibration and the served preprocessing never call this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf

from bundle.manifest import Preprocessing

# Folded into the run seed so the augmentation stream never coincides with the batch-order stream.
_AUGMENT_STREAM = 0x61756721  # "aug!"


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random affine warp (0 = that part off) and how the uncovered pixels are filled."""

    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    shear: float = 0.0  # degrees, horizontal shear angle in [-shear, shear]
    scale: float = 0.0  # zoom uniform in [1 - scale, 1 + scale]
    translate: float = 0.0  # shift uniform in [-translate, translate] * size, per axis
    flip: bool = False  # horizontal flip with probability 1/2
    fill_mode: str = "nearest"  # nearest | reflect | wrap | constant
    fill_value: float = 0.0  # used by fill_mode constant; in the units of the (normalised) inputs

    @property
    def is_identity(self) -> bool:
        return not (self.rotation or self.shear or self.scale or self.translate or self.flip)


def augmentation_from_config(config: object, preprocessing: Preprocessing) -> Augmentation | None:
    """The `Augmentation` of a RunConfig (None when every augment_* option is off)."""
    fill = str(config.augment_fill)
    fill_mode, fill_value = fill, 0.0
    if fill not in ("nearest", "reflect", "wrap"):
        if len(set(preprocessing.mean)) > 1 or len(set(preprocessing.std)) > 1:
            raise ValueError("--augment-fill: a constant fill needs one mean/std for every channel")
        fill_mode = "constant"
        fill_value = (float(fill) / 255.0 - preprocessing.mean[0]) / preprocessing.std[0]
    aug = Augmentation(
        rotation=config.augment_rotation,
        shear=config.augment_shear,
        scale=config.augment_scale,
        translate=config.augment_translate,
        flip=config.augment_flip,
        fill_mode=fill_mode,
        fill_value=fill_value,
    )
    return None if aug.is_identity else aug


def batch_key(seed: int, epoch: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
    """The stateless key of one batch's augmentation: a function of (seed, epoch, batch index) only."""
    key = tf.constant([seed, _AUGMENT_STREAM], tf.int64)
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(epoch, tf.int64))
    return tf.random.experimental.stateless_fold_in(key, tf.cast(batch, tf.int64))


def affine_transforms(
    rotation: tf.Tensor,
    shear: tf.Tensor,
    zoom: tf.Tensor,
    shift_x: tf.Tensor,
    shift_y: tf.Tensor,
    flip: tf.Tensor,
    height: int,
    width: int,
) -> tf.Tensor:
    """`[B, 8]` projective transforms (output pixel -> input pixel) of per-image affine parameters.

    Angles in radians, `zoom` a factor, shifts in pixels, `flip` -1 (mirror) or +1. The forward map is
    `out = c + shift + A (in - c)` with `A = R . Shear . diag(flip * zoom, zoom)` and `c` the centre of the
    pixel grid; the kernel needs its inverse, `in = c + A^-1 (out - c - shift)`.
    """
    cos, sin, tan = tf.cos(rotation), tf.sin(rotation), tf.tan(shear)
    sx, sy = flip * zoom, zoom
    # A = [[cos, -sin], [sin, cos]] @ [[1, tan], [0, 1]] @ [[sx, 0], [0, sy]]
    p, q = cos * sx, (cos * tan - sin) * sy
    r, u = sin * sx, (sin * tan + cos) * sy
    det = p * u - q * r
    i00, i01, i10, i11 = u / det, -q / det, -r / det, p / det
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    ox, oy = cx + shift_x, cy + shift_y
    a2 = cx - (i00 * ox + i01 * oy)
    b2 = cy - (i10 * ox + i11 * oy)
    zeros = tf.zeros_like(a2)
    return tf.stack([i00, i01, a2, i10, i11, b2, zeros, zeros], axis=1)


def warp(images: tf.Tensor, transforms: tf.Tensor, aug: Augmentation) -> tf.Tensor:
    """Apply `[B, 8]` transforms to `[B, H, W, C]` float32 images (bilinear, `aug`'s fill)."""
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=tf.cast(transforms, tf.float32),
        output_shape=tf.shape(images)[1:3],
        fill_value=tf.constant(aug.fill_value, tf.float32),
        interpolation="BILINEAR",
        fill_mode=aug.fill_mode.upper(),
    )


def augment_batch(images: tf.Tensor, key: tf.Tensor, aug: Augmentation) -> tf.Tensor:
    """Randomly warp each image of a `[B, H, W, C]` float32 batch; the draws depend only on `key`."""
    height, width = images.shape[1], images.shape[2]
    u = tf.random.stateless_uniform([tf.shape(images)[0], 6], seed=key, dtype=tf.float32)
    sym = 2.0 * u - 1.0  # uniform in [-1, 1)
    deg = math.pi / 180.0
    flip = tf.where(u[:, 5] < 0.5, -1.0, 1.0) if aug.flip else tf.ones_like(u[:, 5])
    transforms = affine_transforms(
        rotation=sym[:, 0] * (aug.rotation * deg),
        shear=sym[:, 1] * (aug.shear * deg),
        zoom=1.0 + sym[:, 2] * aug.scale,
        shift_x=sym[:, 3] * (aug.translate * width),
        shift_y=sym[:, 4] * (aug.translate * height),
        flip=flip,
        height=height,
        width=width,
    )
    return warp(images, transforms, aug)
