"""TFRecord shards of encoded face images: the format `idembed-train pack` writes and training streams.

A shard folder holds `shard-NNNNN-of-MMMMM.tfrecord` files and `idembed-shards.json`. Each record is a
`tf.train.Example` with

    image/encoded  bytes   the image file's bytes, unchanged (JPEG/PNG/BMP/GIF)
    image/class    int64   class index into the metadata's `class_names`
    image/index    int64   the image's position in the whole set, 0..N-1 (splits select by it)

and `idembed-shards.json` records the class names, the shards with their record counts, and `labels`
(the class of every index, as a `labels.npy` beside it) so splits are computed without reading the shards.
Images are written in a seeded random order across shards, so reading shards in (per-epoch shuffled)
interleaved order through a modest shuffle buffer gives well-mixed batches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data.sources import IMAGE_SUFFIXES, DataError

META_FILE = "idembed-shards.json"
LABELS_FILE = "labels.npy"
FORMAT = "idembed-tfrecord/1"
FEATURE_IMAGE = "image/encoded"
FEATURE_CLASS = "image/class"
FEATURE_INDEX = "image/index"
# Suffixes tf.io.decode_image reads (PGM/PPM are not among them: the streaming path refuses them).
TF_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})


@dataclass(frozen=True)
class FolderListing:
    """An identity-folder tree listed once: relative paths and labels, no pixels.

    `paths` are `<identity>/<file>` relative to `root` as one bytes array (fixed width), so a million
    images cost tens of MB, not the ~100 bytes per entry of a Python string.
    """

    root: Path
    paths: np.ndarray  # dtype S<n> [N]
    labels: np.ndarray  # int32 [N]
    class_names: list[str]


def list_folder(path: Path | str, *, suffixes: frozenset[str] = IMAGE_SUFFIXES) -> FolderListing:
    """One sub-folder per identity; every image file listed (sorted), nothing decoded."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(f"{root}: {len(class_dirs)} identity sub-folder(s); need at least 2")
    rel: list[bytes] = []
    counts: list[int] = []
    for name in class_dirs:
        files = sorted(
            e.name
            for e in os.scandir(root / name)
            if e.is_file() and not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(
                f"{root / name}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        unsupported = [f for f in files if Path(f).suffix.lower() not in suffixes]
        if unsupported:
            raise DataError(
                f"{root / name / unsupported[0]}: {Path(unsupported[0]).suffix} is not read by the streaming "
                f"input ({', '.join(sorted(suffixes))}); convert it or train without --streaming"
            )
        rel.extend(f"{name}/{f}".encode() for f in files)
        counts.append(len(files))
    labels = np.repeat(np.arange(len(class_dirs), dtype=np.int32), counts)
    return FolderListing(root, np.array(rel), labels, class_dirs)


@dataclass(frozen=True)
class ShardSet:
    """A shard folder's metadata: files in order, record counts, class names, the class of every index."""

    root: Path
    files: list[Path]
    counts: list[int]
    labels: np.ndarray  # int32 [N]
    class_names: list[str]

    @property
    def num_images(self) -> int:
        return int(sum(self.counts))


def is_shard_folder(path: Path | str) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / META_FILE).is_file() or any(path.glob("*.tfrecord")))


def read_shard_set(path: Path | str) -> ShardSet:
    root = Path(path)
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise DataError(
            f"{root}: TFRecord shards without {META_FILE}; write them with `idembed-train pack` (which "
            "records class names and per-image labels) or add the file"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        files = [root / s["file"] for s in meta["shards"]]
        counts = [int(s["count"]) for s in meta["shards"]]
        names = [str(n) for n in meta["class_names"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{meta_path}: not a valid shard index ({exc})") from exc
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: listed in {meta_path} but missing")
    labels_path = root / meta.get("labels", LABELS_FILE)
    try:
        labels = np.load(labels_path, allow_pickle=False).astype(np.int32)
    except (OSError, ValueError) as exc:
        raise DataError(f"{labels_path}: cannot read the per-image labels ({exc})") from exc
    if labels.ndim != 1 or len(labels) != sum(counts):
        raise DataError(f"{labels_path}: {labels.shape} labels for {sum(counts)} records in {meta_path}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(f"{labels_path}: labels outside 0..{len(names) - 1}")
    if len(names) < 2:
        raise DataError(f"{meta_path}: {len(names)} class(es); need at least 2 identities")
    return ShardSet(root, files, counts, labels, names)


def _example(encoded: bytes, label: int, index: int) -> bytes:
    import tensorflow as tf

    feature = {
        FEATURE_IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        FEATURE_CLASS: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        FEATURE_INDEX: tf.train.Feature(int64_list=tf.train.Int64List(value=[index])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shards(
    out: Path | str,
    items: Iterable[tuple[bytes, int]],
    *,
    num_images: int,
    class_names: list[str],
    shard_size: int = 10_000,
    progress: Callable[[int], None] | None = None,
) -> ShardSet:
    """Write `(encoded image, class)` items (already in the order wanted on disk) as shards + metadata."""
    import tensorflow as tf

    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: not empty; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    num_shards = max(1, -(-num_images // shard_size))
    names = [f"shard-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    labels = np.empty(num_images, dtype=np.int32)
    counts = [0] * num_shards
    writer = None
    index = 0
    for encoded, label in items:
        shard = index // shard_size
        if index % shard_size == 0:
            if writer is not None:
                writer.close()
            writer = tf.io.TFRecordWriter(str(out / names[shard]))
        assert writer is not None
        writer.write(_example(encoded, int(label), index))
        labels[index] = label
        counts[shard] += 1
        index += 1
        if progress is not None:
            progress(1)
    if writer is not None:
        writer.close()
    if index != num_images:
        raise DataError(f"{out}: {index} images written, {num_images} expected")
    np.save(out / LABELS_FILE, labels, allow_pickle=False)
    meta = {
        "format": FORMAT,
        "class_names": class_names,
        "shards": [{"file": n, "count": c} for n, c in zip(names, counts, strict=True)],
        "num_images": num_images,
        "labels": LABELS_FILE,
        "features": {FEATURE_IMAGE: "bytes", FEATURE_CLASS: "int64", FEATURE_INDEX: "int64"},
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return read_shard_set(out)


def parse_example(serialized):
    """One serialized record -> (encoded image, class, index) tensors."""
    import tensorflow as tf

    spec = {
        FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
        FEATURE_CLASS: tf.io.FixedLenFeature([], tf.int64),
        FEATURE_INDEX: tf.io.FixedLenFeature([], tf.int64),
    }
    parsed = tf.io.parse_single_example(serialized, spec)
    return parsed[FEATURE_IMAGE], parsed[FEATURE_CLASS], parsed[FEATURE_INDEX]


def parse_examples(serialized):
    """A batch of serialized records -> (encoded images, classes, indices), one vectorised parse."""
    import tensorflow as tf

    spec = {
        FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
        FEATURE_CLASS: tf.io.FixedLenFeature([], tf.int64),
        FEATURE_INDEX: tf.io.FixedLenFeature([], tf.int64),
    }
    parsed = tf.io.parse_example(serialized, spec)
    return parsed[FEATURE_IMAGE], parsed[FEATURE_CLASS], parsed[FEATURE_INDEX]
