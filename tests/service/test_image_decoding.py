"""Decoding request images: bad input becomes a named client error; good input matches training's path."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from bundle.manifest import InputSpec, Preprocessing
from bundle.preprocess import preprocess_image
from service.errors import InvalidImageError, PayloadTooLargeError, ServiceError, UnsupportedMediaTypeError
from service.preprocess import ImagePreprocessor, decode_base64, decode_image
from testkit import tiny_bundle

FIELDS = tiny_bundle.manifest_fields()
PRE = Preprocessing(**FIELDS["preprocessing"])
SPEC = InputSpec(**FIELDS["input"])


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (no pixel data): the decompression-bomb shape, in 60 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "PPM", "BMP"])
def test_supported_formats_decode(fmt: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, size=(8, 8), dtype=np.uint8)
    image = decode_image(encode(pixels, fmt), max_pixels=1000)
    assert image.size == (8, 8)


def test_service_preprocessing_equals_the_shared_training_preprocessing() -> None:
    images, _ = tiny_bundle.digits()
    pre = ImagePreprocessor(PRE, SPEC, max_pixels=10_000)
    batch = pre([encode(images[i], "PNG") for i in range(5)])
    expected = np.stack([preprocess_image(images[i], PRE, SPEC) for i in range(5)])
    np.testing.assert_array_equal(batch, expected)
    assert batch.shape == (5, 8, 8, 1) and batch.dtype == np.float32


def test_empty_bytes_are_an_invalid_image() -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"", max_pixels=100)


def test_random_bytes_are_an_invalid_image() -> None:
    with pytest.raises(InvalidImageError, match="not a recognised image"):
        decode_image(b"not an image at all", max_pixels=100)


def test_truncated_png_is_an_invalid_image() -> None:
    data = encode(np.zeros((64, 64), np.uint8) + 7, "PNG")
    with pytest.raises(InvalidImageError):
        decode_image(data[: len(data) // 2], max_pixels=10_000)


def test_unsupported_format_is_unsupported_media_type() -> None:
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="GIF")
    with pytest.raises(UnsupportedMediaTypeError, match="GIF"):
        decode_image(buf.getvalue(), max_pixels=100)


def test_header_claiming_20000x20000_is_refused_before_decoding() -> None:
    with pytest.raises(PayloadTooLargeError, match="20000x20000"):
        decode_image(png_header_claiming(20000, 20000), max_pixels=16_000_000)


def test_one_pixel_image_is_accepted_and_resized_to_the_model_input() -> None:
    pre = ImagePreprocessor(PRE, SPEC, max_pixels=100)
    assert pre([encode(np.full((1, 1), 200, np.uint8), "PNG")]).shape == (1, 8, 8, 1)


def test_bad_base64_names_the_image() -> None:
    with pytest.raises(InvalidImageError, match=r"images\[3\]"):
        decode_base64("***", where="images[3]")


def test_data_url_prefix_and_line_breaks_are_accepted() -> None:
    assert decode_base64("data:image/png;base64,aGk=", where="x") == b"hi"
    assert decode_base64("aG\nk=\n", where="x") == b"hi"


@pytest.mark.parametrize("cut", [20, 40, 60])
def test_corrupted_bmp_and_ppm_headers_are_invalid_images_not_crashes(cut: int) -> None:
    for fmt in ("BMP", "PPM"):
        data = bytearray(encode(np.full((16, 16), 9, np.uint8), fmt))
        data[cut % len(data) : cut % len(data) + 8] = b"\xff" * 8
        try:
            outcome: object = decode_image(bytes(data), max_pixels=1_000_000)
        except ServiceError as exc:
            outcome = exc
        # Either it still decodes or it is refused as a client error; any other exception fails the test.
        assert isinstance(
            outcome, Image.Image | InvalidImageError | PayloadTooLargeError | UnsupportedMediaTypeError
        )
