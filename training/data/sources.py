"""Dataset sources -> one in-memory form (uint8 images, int labels, class names): digits, IDX, folders."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Suffixes read from an identity folder; anything else (README, .DS_Store, thumbnails.db) is not an image.
IMAGE_SUFFIXES = frozenset({".pgm", ".ppm", ".pnm", ".png", ".jpg", ".jpeg", ".bmp"})
# IDX magic numbers (http://yann.lecun.com/exdb/mnist/): 0x08 = unsigned byte, last byte = number of dims.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


class DataError(ValueError):
    """A dataset that cannot be trained on; the message names the file or class folder at fault."""


@dataclass(frozen=True)
class ImageSet:
    """A whole dataset before splitting: `images[i]` is uint8 `[H, W]` (gray) or `[H, W, 3]` (RGB)."""

    images: np.ndarray | list[np.ndarray]
    labels: np.ndarray  # int64 [N], index into class_names
    class_names: list[str]
    source: str
    # Group of each class (`groups[k]` for `class_names[k]`, e.g. an Omniglot alphabet), or None when the
    # dataset has no group level; `--heldout-groups` holds out whole groups.
    groups: list[str] | None = None
    # Files read once because their bytes equal a file already read for the same identity (pooled zips).
    duplicates_skipped: int = 0
    # Identities a built-in benchmark holds out unless told otherwise (digit-pairs: its balanced 30).
    suggested_heldout: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.source}: {len(self.images)} images but {len(self.labels)} labels")
        if self.groups is not None and len(self.groups) != len(self.class_names):
            raise DataError(f"{self.source}: {len(self.groups)} groups for {len(self.class_names)} classes")
        if len(self.class_names) < 2:
            raise DataError(f"{self.source}: {len(self.class_names)} class(es); need at least 2 identities")


def load_digits_set() -> ImageSet:
    """sklearn's bundled 8x8 digits (1797 images, 10 classes), pixel values 0..16 rescaled to uint8 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    names = [str(int(t)) for t in digits.target_names]
    return ImageSet(images, digits.target.astype(np.int64), names, "digits")


def _open_maybe_gz(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc


def read_idx(path: Path | str, expected_magic: int) -> np.ndarray:
    """Read one IDX file (raw or .gz) of unsigned bytes; the header must match `expected_magic`."""
    path = Path(path)
    data = _open_maybe_gz(path)
    if len(data) < 4:
        raise DataError(f"{path}: too short to be an IDX file")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: IDX magic {magic:#010x}, expected {expected_magic:#010x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise DataError(f"{path}: {len(data) - header} data bytes, header shape {shape} needs more or fewer")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _idx_pairs(path: Path) -> list[tuple[Path, Path]]:
    """(images, labels) file pairs for an IDX folder or a prefix such as `.../train` (raw or .gz)."""
    if path.is_dir():
        image_files = sorted(path.glob("*-images-idx3-ubyte*"))
    else:
        image_files = sorted(path.parent.glob(path.name + "-images-idx3-ubyte*"))
    pairs = []
    for img in image_files:
        label_name = img.name.replace("-images-idx3-ubyte", "-labels-idx1-ubyte")
        lbl = img.with_name(label_name)
        if not lbl.exists():
            raise DataError(f"{img}: no matching labels file {lbl.name}")
        pairs.append((img, lbl))
    return pairs


def is_idx_source(path: Path | str) -> bool:
    return bool(_idx_pairs(Path(path)))


def idx_image_size(path: Path | str) -> int:
    """Height of the first IDX image file of a folder/prefix (28 for MNIST-family data)."""
    images = read_idx(_idx_pairs(Path(path))[0][0], _IDX_IMAGES_MAGIC)
    return int(images.shape[1])


def load_idx_set(path: Path | str) -> ImageSet:
    """All IDX image/label pairs under a folder (e.g. train + t10k) or one prefix, concatenated.

    Both official parts are pooled on purpose: our splits are by identity, not by the publisher's split.
    """
    path = Path(path)
    pairs = _idx_pairs(path)
    if not pairs:
        raise DataError(f"{path}: no '*-images-idx3-ubyte[.gz]' files found")
    images, labels = [], []
    for img_file, lbl_file in pairs:
        x = read_idx(img_file, _IDX_IMAGES_MAGIC)
        y = read_idx(lbl_file, _IDX_LABELS_MAGIC)
        if len(x) != len(y):
            raise DataError(f"{img_file}: {len(x)} images but {lbl_file.name} has {len(y)} labels")
        images.append(x)
        labels.append(y)
    x_all = np.concatenate(images)
    raw = np.concatenate(labels).astype(np.int64)
    values = np.unique(raw)
    names = [str(int(v)) for v in values]
    return ImageSet(x_all, np.searchsorted(values, raw).astype(np.int64), names, str(path))


def _read_image(path: Path, color_mode: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(color_mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from exc


def load_folder_set(path: Path | str, color_mode: str = "L") -> ImageSet:
    """One sub-folder per identity, images inside (PGM/PNG/JPEG/BMP; gray or RGB), decoded to `color_mode`.

    Images are decoded eagerly so that a broken file fails now, naming itself, not in the middle of training.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(f"{root}: {len(class_dirs)} identity sub-folder(s); need at least 2")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for k, class_dir in enumerate(class_dirs):
        files = sorted(
            f
            for f in class_dir.iterdir()
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        )
        if not files:
            raise DataError(f"{class_dir}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in files:
            images.append(_read_image(f, color_mode))
            labels.append(k)
    return ImageSet(images, np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs], str(root))
