"""Training-only augmentation: seeded per (seed, epoch, batch), exact when off, geometry right, validated."""

import math

import numpy as np
import pytest
import tensorflow as tf

from bundle.manifest import Preprocessing
from training.config import ConfigError, RunConfig
from training.data import build_splits, eval_dataset, train_dataset
from training.data.augment import (
    Augmentation,
    affine_transforms,
    augment_batch,
    augmentation_from_config,
    warp,
)

FULL = Augmentation(rotation=15.0, shear=10.0, scale=0.1, translate=0.1, flip=True)


def _images(n: int = 10, size: int = 9, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 1)).astype(np.float32)


def _transform(n: int, rotation: float = 0.0, flip: float = 1.0, shift_x: float = 0.0, size: int = 9):
    def col(v):
        return tf.fill([n], tf.constant(v, tf.float32))

    return affine_transforms(col(rotation), col(0.0), col(1.0), col(shift_x), col(0.0), col(flip), size, size)


def _batches(x, augment, **kw):
    y = np.arange(len(x), dtype=np.int32)
    return [
        (a.numpy(), b.numpy()) for a, b in train_dataset(x, y, batch_size=4, seed=7, augment=augment, **kw)
    ]


def test_same_seed_and_epoch_give_the_same_batches_and_resume_matches():
    x = _images()
    full = _batches(x, FULL, epochs=3)
    assert len(full) == 9
    again = _batches(x, FULL, epochs=3)
    resumed = _batches(x, FULL, epochs=3, initial_epoch=2)
    for (a, la), (b, lb) in zip(full, again, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    for (a, _), (b, _) in zip(full[6:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    # The batch order is the un-augmented one (augmentation never changes which images a batch holds).
    plain = _batches(x, None, epochs=3)
    assert [lbl.tolist() for _, lbl in full] == [lbl.tolist() for _, lbl in plain]

    # Augmented, and differently in another epoch: image 0 in epoch 0 vs epoch 1.
    def image0(epoch):
        for imgs, lbl in full[3 * epoch : 3 * epoch + 3]:
            if 0 in lbl:
                return imgs[list(lbl).index(0)]

    assert not np.array_equal(image0(0), x[0]) and not np.array_equal(image0(0), image0(1))


def test_another_seed_draws_other_distortions():
    x = _images(4)
    key = tf.constant([1, 2], tf.int64)
    a = augment_batch(tf.constant(x), key, FULL).numpy()
    assert np.array_equal(a, augment_batch(tf.constant(x), key, FULL).numpy())
    assert not np.array_equal(a, augment_batch(tf.constant(x), tf.constant([1, 3], tf.int64), FULL).numpy())


def test_all_options_zero_is_bit_exact():
    x = _images(5)
    off = Augmentation()
    assert off.is_identity
    out = augment_batch(tf.constant(x), tf.constant([0, 0], tf.int64), off).numpy()
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(_transform(5).numpy(), np.tile([1, 0, 0, 0, 1, 0, 0, 0], (5, 1)))
    for (a, la), (b, lb) in zip(_batches(x, off, epochs=1), _batches(x, None, epochs=1), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    assert augmentation_from_config(RunConfig(), Preprocessing(color_mode="L", mean=[0.5], std=[0.5])) is None


def test_rotation_by_90_degrees_turns_a_known_image():
    image = np.zeros((1, 9, 9, 1), np.float32)
    image[0, 1, 2:7, 0] = 1.0  # a horizontal bar near the top
    image[0, 2:5, 2, 0] = 0.5  # and a short vertical one below its left end
    out = warp(tf.constant(image), _transform(1, rotation=math.pi / 2), Augmentation()).numpy()
    # +90 degrees in image coordinates (y down) turns clockwise on screen: np.rot90 with k=-1.
    np.testing.assert_allclose(out[0, :, :, 0], np.rot90(image[0, :, :, 0], k=-1), atol=1e-5)
    assert out[0, 2:7, 7, 0].min() > 0.99  # the bar is now vertical on the right
    assert out[0, 2, 4:7, 0].min() > 0.49  # and the short one horizontal, left of its top end


def test_flip_mirrors_exactly_and_is_off_by_default():
    x = _images(3)
    out = warp(tf.constant(x), _transform(3, flip=-1.0), Augmentation()).numpy()
    np.testing.assert_array_equal(out, x[:, :, ::-1, :])
    assert RunConfig().augment_flip is False


def test_constant_fill_is_the_raw_pixel_value_after_normalisation():
    prep = Preprocessing(color_mode="L", mean=[0.5], std=[0.5])
    aug = augmentation_from_config(RunConfig(augment_translate=0.2, augment_fill="255"), prep)
    assert aug.fill_mode == "constant" and aug.fill_value == 1.0  # white paper -> +1
    x = np.full((1, 9, 9, 1), -1.0, np.float32)
    out = warp(tf.constant(x), _transform(1, shift_x=3.0), aug).numpy()[0, :, :, 0]
    assert (out[:, :3] == 1.0).all() and (out[:, 3:] == -1.0).all()
    edge = warp(tf.constant(x), _transform(1, shift_x=3.0), Augmentation(translate=0.2)).numpy()
    assert (edge == -1.0).all()  # nearest repeats the edge pixel


def test_evaluation_inputs_are_never_augmented():
    plain = RunConfig(heldout_classes=["7", "8", "9"], val_fraction=0.2)
    augmented = RunConfig(**{**plain.model_dump(), "augment_rotation": 30.0, "augment_translate": 0.2})
    a, b = build_splits(plain), build_splits(augmented)
    for name in ("x_train", "x_val", "x_heldout"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    batch = next(iter(eval_dataset(b.x_heldout, b.y_heldout, batch_size=64)))[0].numpy()
    np.testing.assert_array_equal(batch, b.x_heldout[:64])


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"augment_rotation": -1.0}, "--augment-rotation:"),
        ({"augment_rotation": 181.0}, "--augment-rotation:"),
        ({"augment_shear": 61.0}, "--augment-shear:"),
        ({"augment_scale": 1.0}, "--augment-scale:"),
        ({"augment_scale": -0.1}, "--augment-scale:"),
        ({"augment_translate": 0.6}, "--augment-translate:"),
        ({"augment_fill": "black"}, "--augment-fill: 'black': choose nearest, reflect, wrap"),
        ({"augment_fill": "256"}, "--augment-fill:"),
    ],
)
def test_augment_options_are_validated_naming_them(options, named):
    with pytest.raises(ConfigError, match=named):
        RunConfig.from_options(**options)
