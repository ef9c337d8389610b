"""Image -> model input, exactly as the manifest's `preprocessing` says; shared by training and service.

Training's data loaders and the service both call `preprocess_pil`, so an image file gives the same tensor
(and therefore the same embedding) on both sides; there is no second implementation to drift.

The steps split in two: `pixels` (decode, `convert`, resize: uint8 `[H, W, C]`) and the normalisation
(float32, channel order, `* scale`, `- mean`, `/ std`, layout). `normalization` is the one definition of the
second part, as constants; three places apply it, with the same float32 operations in the same order:
`normalize_pixels` here (numpy), `training.model.PixelNormalization` (inside the training graph, for uint8
batches from the streamed input) and the preprocessing subgraph `training.export` can prepend to the ONNX
model (`export --embed-preprocessing`). A bundle with that subgraph declares `input.dtype = "uint8"`: its
model takes the uint8 pixels and `preprocess_pil` stops after the resize.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from bundle.manifest import InputSpec, Preprocessing

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class Normalization:
    """The steps after the resize, as constants: uint8 pixels `[..., H, W, C]` (channels in `color_mode`
    order) -> float32 -> channels reversed (`reverse_channels`: BGR models) -> `* scale` -> `- mean` ->
    `/ std` (per channel, in model channel order) -> `[..., C, H, W]` when `channels_first`."""

    scale: np.float32
    mean: np.ndarray  # float32 [C] or [1]
    std: np.ndarray  # float32 [C] or [1]
    reverse_channels: bool
    channels_first: bool


def normalization(spec: Preprocessing, input_spec: InputSpec) -> Normalization:
    """The normalisation a bundle's manifest defines (see `Normalization`)."""
    return Normalization(
        scale=np.float32(spec.scale),
        mean=np.asarray(spec.mean, dtype=np.float32),
        std=np.asarray(spec.std, dtype=np.float32),
        reverse_channels=spec.channels == 3 and spec.channel_order == "BGR",
        channels_first=input_spec.layout == "NCHW",
    )


def normalize_pixels(pixels: object, spec: Preprocessing, input_spec: InputSpec) -> np.ndarray:
    """uint8 pixels `[H, W, C]` or `[N, H, W, C]` (an array, or a Pillow image) -> float32 model input."""
    norm = normalization(spec, input_spec)
    x = np.asarray(pixels, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    elif norm.reverse_channels:
        x = x[..., ::-1]
    # In place on the fresh float32 array: the same float32 operations in the same order as
    # `(x * scale - mean) / std`, without two temporary arrays.
    x *= norm.scale
    x -= norm.mean
    x /= norm.std
    if norm.channels_first:
        x = np.moveaxis(x, -1, -3)
    return np.ascontiguousarray(x, dtype=np.float32)


def pixels(image: Image.Image, spec: Preprocessing, input_spec: InputSpec) -> Image.Image:
    """A decoded image in `color_mode` at the model's input size (the steps before the normalisation)."""
    # convert() to the mode the image already has would only copy it.
    img = image if image.mode == spec.color_mode else image.convert(spec.color_mode)
    if img.size != (input_spec.width, input_spec.height):
        img = img.resize((input_spec.width, input_spec.height), _RESAMPLE[spec.resample])
    return img


def preprocess_pil(image: Image.Image, spec: Preprocessing, input_spec: InputSpec) -> np.ndarray:
    """One decoded image -> the model input without the batch axis: float32 HWC or CHW, or, for a bundle
    whose model normalises itself (`input.dtype == "uint8"`), its uint8 pixels `[H, W, C]`."""
    img = pixels(image, spec, input_spec)
    if input_spec.dtype == "uint8":
        x = np.asarray(img, dtype=np.uint8)
        return x[:, :, None] if x.ndim == 2 else x
    return normalize_pixels(img, spec, input_spec)


def preprocess_image(pixels: np.ndarray, spec: Preprocessing, input_spec: InputSpec) -> np.ndarray:
    """A uint8 array (H, W) or (H, W, C) -> model input; goes through Pillow so it matches file input."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    return preprocess_pil(Image.fromarray(pixels), spec, input_spec)


def preprocess_batch(images: list[Image.Image], spec: Preprocessing, input_spec: InputSpec) -> np.ndarray:
    """Several decoded images -> one batch `[N, ...]` of the model's input dtype."""
    if not images:
        shape = input_spec.shape(0)
        return np.zeros((0, *shape[1:]), dtype=input_spec.dtype)
    return np.stack([preprocess_pil(im, spec, input_spec) for im in images])
