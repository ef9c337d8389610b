"""Image -> model input, exactly as the manifest's `preprocessing` says; shared by training and service.

Training's data loaders and the service both call `preprocess_pil`, so an image file gives the same tensor
(and therefore the same embedding) on both sides; there is no second implementation to drift.
"""

from __future__ import annotations

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


def preprocess_pil(image: Image.Image, spec: Preprocessing, input_spec: InputSpec) -> np.ndarray:
    """One decoded image -> float32 array shaped for the model without the batch axis (HWC or CHW)."""
    # convert() to the mode the image already has would only copy it.
    img = image if image.mode == spec.color_mode else image.convert(spec.color_mode)
    if img.size != (input_spec.width, input_spec.height):
        img = img.resize((input_spec.width, input_spec.height), _RESAMPLE[spec.resample])
    x = np.asarray(img, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    elif spec.channel_order == "BGR":
        x = x[:, :, ::-1]
    # In place on the fresh float32 array: the same float32 operations in the same order as
    # `(x * scale - mean) / std`, without two temporary arrays.
    x *= np.float32(spec.scale)
    x -= np.asarray(spec.mean, dtype=np.float32)
    x /= np.asarray(spec.std, dtype=np.float32)
    if input_spec.layout == "NCHW":
        x = np.transpose(x, (2, 0, 1))
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocess_image(pixels: np.ndarray, spec: Preprocessing, input_spec: InputSpec) -> np.ndarray:
    """A uint8 array (H, W) or (H, W, C) -> model input; goes through Pillow so it matches file input."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    return preprocess_pil(Image.fromarray(pixels), spec, input_spec)


def preprocess_batch(images: list[Image.Image], spec: Preprocessing, input_spec: InputSpec) -> np.ndarray:
    """Several decoded images -> one float32 batch `[N, ...]`."""
    if not images:
        shape = input_spec.shape(0)
        return np.zeros((0, *shape[1:]), dtype=np.float32)
    return np.stack([preprocess_pil(im, spec, input_spec) for im in images])
