"""Streaming training input: images are read and decoded per batch by tf.data, never held in memory.

Three sources stream (`RunConfig.dataset`):

- an identity folder with `--streaming`: listed once (relative paths and labels, no pixels);
- TFRecord shards written by `idembed-train pack` (a folder holding `idembed-shards.json`);
- insightface/MXNet RecordIO, `train.rec` with its `train.idx` (read with `os.pread`, no MXNet).

What stays in memory grows with the number of images only by their listing (a path or an offset and a
label each: ~30 bytes per image), never by their pixels. The split is by identity, as for the in-memory
sources: held-out identities never reach training; their images (up to `MAX_HELDOUT_IMAGES`, whole identities
in seeded order) and a seeded sample of validation images (`MAX_VAL_IMAGES`) are decoded into memory for
evaluation, which is what `evaluate`/`export` score and calibrate on.

Preprocessing: the training stream decodes (and resizes) with TensorFlow ops in parallel (`decode_pixels`)
and yields uint8 pixel batches; the model normalises them inside its graph (`training.model.
PixelNormalization`, the manifest's normalisation), so the host does no float pass (with augmentation on,
each batch is normalised on the host before it is warped, as the warp works in normalised units). The
in-memory evaluation images go through `bundle.preprocess.preprocess_pil`, the service's own code. Without a
resize (face crops stored at the model's input size, e.g. insightface's 112x112) the pixels are
bit-identical: JPEGs are decoded with the accurate integer IDCT Pillow's libjpeg uses, and RGB -> L is
Pillow's integer formula. With a resize, TF's antialiased resize (rounded back to uint8 as Pillow does)
stays within 2 grey levels of Pillow's fixed-point filter. `tests/training/test_formats.py` measures and
bounds both.

Order: for folders and .rec every epoch is a full permutation of the training images, a stateless function
of (seed, epoch), so a resumed run sees the batches the uninterrupted run saw. TFRecord shards are read in a
per-epoch (seeded) shard order, interleaved, then permuted in seeded blocks of `shuffle_buffer` records
(pack writes images in random order, so blocks are already mixed across identities). With `deterministic` (the
default) parallel maps keep their order; turning it off lets tf.data hand out whichever image decodes first.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from bundle.manifest import InputSpec, Preprocessing
from bundle.preprocess import preprocess_pil
from training.config import RunConfig
from training.data.augment import Augmentation, augment_batch, batch_key
from training.data.in_memory import Splits, model_input, steps_per_epoch
from training.data.recordio import RecordIOError, list_rec, read_images
from training.data.sources import DataError
from training.data.splits import choose_heldout
from training.data.tfrecord import (
    TF_IMAGE_SUFFIXES,
    ShardSet,
    is_shard_folder,
    list_folder,
    parse_examples,
    read_shard_set,
)
from training.model import PixelNormalization

AUTOTUNE = tf.data.AUTOTUNE
MAX_HELDOUT_IMAGES = 2000
MAX_VAL_IMAGES = 1000
# Training images decoded into memory for what needs pixels of seen identities (the PCA-on-pixels baseline).
TRAIN_SAMPLE_IMAGES = 256
READ_CHUNK = 64  # .rec records read per Python call (amortises the call; preads release the GIL)
TFRECORD_CYCLE = 8
PARSE_BATCH = 256  # records parsed per tf.io.parse_example call

_TF_RESIZE = {
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "lanczos": "lanczos3",
    "box": "area",
}


def source_kind(dataset: str, streaming: bool = False) -> str | None:
    """'rec', 'tfrecord' or 'folder' for a streamed dataset, None for the in-memory sources."""
    if dataset == "digits":
        return None
    path = Path(dataset)
    if path.suffix == ".rec" and path.is_file():
        return "rec"
    if is_shard_folder(path):
        return "tfrecord"
    if streaming and path.is_dir():
        return "folder"
    return None


def is_streaming(config: RunConfig) -> bool:
    return source_kind(config.dataset, getattr(config, "streaming", False)) is not None


# --- preprocessing -----------------------------------------------------------------------------------------


def decode_pixels(
    encoded: tf.Tensor, preprocessing: Preprocessing, input_spec: InputSpec, *, jpeg_at_size: bool = False
) -> tf.Tensor:
    """Encoded bytes -> uint8 `[H, W, C]`: decode, Pillow's `convert`, resize when the size differs.

    `jpeg_at_size` is the fast path for sets of JPEGs already at the input size (face crops), chosen by
    `probe_jpeg_at_size`: one decode, no branches (a `tf.cond` per image costs more than the decode). A JPEG
    decoded to RGB and converted with Pillow's formula gives Pillow's L exactly, gray JPEGs included
    (replicated channels: `(v * 65536 + 2^15) >> 16 = v`). An image of another size fails `ensure_shape`.
    """
    height, width = input_spec.height, input_spec.width
    channels = 1 if preprocessing.color_mode == "L" else 3
    if jpeg_at_size:
        img = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
        if preprocessing.color_mode == "L":
            img = _gray(img)
        return tf.ensure_shape(img, [height, width, channels])
    img = tf.cond(
        tf.io.is_jpeg(encoded),
        # Pillow's libjpeg uses the accurate integer IDCT; TF's default is the fast one (differs by a few
        # grey levels), so it is asked for explicitly.
        lambda: tf.io.decode_jpeg(encoded, channels=0, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=0, expand_animations=False, dtype=tf.uint8),
    )
    img = _convert(img, preprocessing.color_mode)
    shape = tf.shape(img)

    def resized() -> tf.Tensor:
        out = tf.image.resize(
            tf.cast(img, tf.float32),
            [height, width],
            method=_TF_RESIZE[preprocessing.resample],
            antialias=True,
        )
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
    img = tf.cond(same, lambda: img, resized)
    return tf.ensure_shape(img, [height, width, channels])


def normalize(pixels: tf.Tensor, preprocessing: Preprocessing, input_spec: InputSpec) -> tf.Tensor:
    """uint8 `[..., H, W, C]` (one image or a batch) -> float32 model input: the manifest's normalisation
    (`training.model.PixelNormalization`, what the model applies to streamed pixel batches)."""
    return PixelNormalization(preprocessing, input_spec)(pixels)


def decode_and_preprocess(
    encoded: tf.Tensor, preprocessing: Preprocessing, input_spec: InputSpec
) -> tf.Tensor:
    """Encoded image bytes -> model input `[H, W, C]` float32 (or `[C, H, W]`), with TF ops only (tests and
    benchmarks; the training stream stops at `decode_pixels` and the model normalises).

    Step for step what `bundle.preprocess.preprocess_pil` does: decode, Pillow's `convert` (RGB -> L as
    `(19595 R + 38470 G + 7471 B + 2^15) >> 16`, L -> RGB by repetition, alpha dropped), resize only when
    the size differs, `* scale`, `(x - mean) / std` (`decode_pixels`, then `normalize`).
    """
    return normalize(decode_pixels(encoded, preprocessing, input_spec), preprocessing, input_spec)


def _convert(img: tf.Tensor, mode: str) -> tf.Tensor:
    """Pillow's `Image.convert(mode)` for uint8 images of 1-4 channels (L, LA, RGB, RGBA)."""
    c = tf.shape(img)[-1]

    if mode == "L":
        return tf.cond(c >= 3, lambda: _gray(img), lambda: img[..., :1])
    return tf.cond(c >= 3, lambda: img[..., :3], lambda: tf.tile(img[..., :1], [1, 1, 3]))


def _gray(img: tf.Tensor) -> tf.Tensor:
    """Pillow's RGB -> L: `(19595 R + 38470 G + 7471 B + 2^15) >> 16` on the first three channels."""
    rgb = tf.cast(img[..., :3], tf.int32)
    y = tf.bitwise.right_shift(rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000, 16)
    return tf.cast(y, tf.uint8)[..., None]


def probe_jpeg_at_size(encoded: list[bytes], input_spec: InputSpec) -> bool:
    """True when every sampled image is a baseline RGB/gray JPEG of exactly the input size (the fast path
    of `decode_pixels` then applies; insightface's 112x112 crops are)."""
    if not encoded:
        return False
    for data in encoded:
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                    return False
                if img.size != (input_spec.width, input_spec.height):
                    return False
        except (UnidentifiedImageError, OSError):
            return False
    return True


def preprocess_encoded(
    encoded: list[bytes], preprocessing: Preprocessing, input_spec: InputSpec, names: list[str] | None = None
) -> np.ndarray:
    """Encoded images -> float32 batch through the bundle's (the service's) preprocessing."""
    if not encoded:
        return np.zeros((0, *input_spec.shape(0)[1:]), dtype=np.float32)
    out = np.empty((len(encoded), *input_spec.shape(1)[1:]), dtype=np.float32)
    for i, data in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(data)) as img:
                out[i] = preprocess_pil(img, preprocessing, input_spec)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            where = names[i] if names is not None else f"image {i}"
            raise DataError(f"{where}: unreadable image ({exc})") from exc
    return out


# --- listing and splits ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """A streamed dataset without pixels: per image a locator and a label."""

    kind: str  # rec | tfrecord | folder
    source: Path
    labels: np.ndarray  # int32 [N]
    class_names: list[str]
    locators: np.ndarray | None  # folder: relative paths (bytes); rec: offsets; tfrecord: None (index)
    shards: ShardSet | None = None
    spans: np.ndarray | None = None  # rec: bytes from each record to the next (one read per record)

    def describe(self, i: int) -> str:
        if self.kind == "folder":
            assert self.locators is not None
            return str(self.source / self.locators[i].decode())
        if self.kind == "rec":
            assert self.locators is not None
            return f"{self.source}: offset {int(self.locators[i])}"
        return f"{self.source}: image/index {i}"


def list_source(dataset: str, streaming: bool = False) -> Listing:
    kind = source_kind(dataset, streaming)
    path = Path(dataset)
    if kind == "rec":
        rec = list_rec(path)
        return Listing("rec", path, rec.labels, rec.class_names, rec.offsets, spans=rec.spans)
    if kind == "tfrecord":
        shards = read_shard_set(path)
        return Listing("tfrecord", path, shards.labels, shards.class_names, None, shards)
    if kind == "folder":
        folder = list_folder(path, suffixes=TF_IMAGE_SUFFIXES)
        return Listing("folder", path, folder.labels, folder.class_names, folder.paths)
    raise DataError(
        f"{dataset}: not a streamed source (.rec, TFRecord shard folder, or folder + --streaming)"
    )


def val_split(labels: np.ndarray, train_mask: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Per training identity, `round(val_fraction * n)` images (at most n - 1) chosen with `seed`: a boolean
    mask over all images. Vectorised (one sort), so it scales to millions of images and 100k identities."""
    n = len(labels)
    rng = np.random.default_rng(seed)
    # One int64 sort of (label, random key) instead of a lexsort: ~10x faster at millions of images.
    keys = rng.integers(0, 2**31, size=n, dtype=np.int64)
    order = np.argsort((labels.astype(np.int64) << 31) | keys)
    sorted_labels = labels[order]
    counts = np.bincount(labels, minlength=int(labels.max()) + 1 if n else 0)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(n) - starts[sorted_labels]
    n_val = np.minimum(np.round(val_fraction * counts).astype(np.int64), np.maximum(counts - 1, 0))
    chosen = order[rank < n_val[sorted_labels]]
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return mask & train_mask


@dataclass(frozen=True)
class TrainStream:
    """The training side of a streamed split: builds the tf.data input of `fit()`."""

    listing: Listing
    indices: np.ndarray  # int64 [n] image indices (into the listing) of the training images
    train_labels: np.ndarray  # int32 [n] training label of each
    preprocessing: Preprocessing
    input_spec: InputSpec
    shuffle_buffer: int = 10_000
    deterministic: bool = True
    jpeg_at_size: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return len(self.indices)

    def steps_per_epoch(self, batch_size: int) -> int:
        return steps_per_epoch(self.num_examples, batch_size)

    def dataset(
        self,
        *,
        batch_size: int,
        seed: int,
        epochs: int,
        initial_epoch: int = 0,
        augment: Augmentation | None = None,
    ) -> tf.data.Dataset:
        """Batches for epochs `initial_epoch .. epochs-1` in one stream (each epoch ends on its own batch).

        Batches are `(uint8 pixels [B, H, W, C], int32 labels)`: the model normalises the pixels in its graph.
        `augment` warps each batch with the same (seed, epoch, batch index) keys as the in-memory input, so a
        resumed run sees the same augmented batches; those are normalised on the host first (float32
        batches), because the warp's fill value is in normalised units."""
        if self.listing.kind == "tfrecord":
            per_epoch = self._tfrecord_epoch(batch_size, seed)
        else:
            per_epoch = self._indexed_epoch(batch_size, seed)
        if augment is not None and not augment.is_identity:
            plain = per_epoch

            def per_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
                return (
                    plain(epoch)
                    .enumerate()
                    .map(
                        lambda b, xy: (
                            augment_batch(
                                normalize(xy[0], self.preprocessing, self.input_spec),
                                batch_key(seed, epoch, b),
                                augment,
                            ),
                            xy[1],
                        )
                    )
                )

        # Epochs in order, but the next one is opened (and its first reads started) while this one is still
        # decoded: with flat_map every epoch start stalled the whole stream (TFRecord: until the first shuffle
        # block was read and permuted).
        ds = tf.data.Dataset.range(initial_epoch, epochs).interleave(
            per_epoch, cycle_length=1, num_parallel_calls=1, deterministic=True
        )
        options = tf.data.Options()
        options.deterministic = self.deterministic
        return ds.with_options(options).prefetch(AUTOTUNE)

    def _decode(self, encoded: tf.Tensor) -> tf.Tensor:
        # uint8 pixels: decode (+ resize) is all the host does; the model graph normalises them.
        return decode_pixels(encoded, self.preprocessing, self.input_spec, jpeg_at_size=self.jpeg_at_size)

    def _indexed_epoch(self, batch_size: int, seed: int):
        n = self.num_examples
        labels = tf.constant(self.train_labels, dtype=tf.int32)
        det = self.deterministic
        if self.listing.kind == "folder":
            assert self.listing.locators is not None
            paths = tf.constant(self.listing.locators[self.indices])
            prefix = str(self.listing.source) + os.sep

            def load(pos: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                data = tf.io.read_file(tf.strings.join([prefix, tf.gather(paths, pos)]))
                return self._decode(data), tf.gather(labels, pos)

            def epoch(e: tf.Tensor) -> tf.data.Dataset:
                order = tf.argsort(
                    tf.random.stateless_uniform([n], seed=tf.stack([tf.constant(seed, tf.int64), e]))
                )
                return (
                    tf.data.Dataset.from_tensor_slices(order)
                    .map(load, num_parallel_calls=AUTOTUNE, deterministic=det)
                    .batch(batch_size)
                )

            return epoch

        assert self.listing.locators is not None
        offsets = tf.constant(self.listing.locators[self.indices], dtype=tf.int64)
        # The label each image's own header must carry: its class's value, looked up per training label
        # (a K-entry table, not one number per image).
        origin = np.zeros(int(self.train_labels.max()) + 1 if len(self.train_labels) else 0, np.int64)
        origin[self.train_labels] = self.listing.labels[self.indices]  # training label -> dataset label
        raw = tf.constant([float(self.listing.class_names[k]) for k in origin], dtype=tf.float64)
        rec_path = self.listing.source
        size = rec_path.stat().st_size
        assert self.listing.spans is not None
        spans = tf.constant(self.listing.spans[self.indices], dtype=tf.int32)

        def read_chunk(offs: np.ndarray, lengths: np.ndarray, want: np.ndarray) -> np.ndarray:
            images, got = read_images(rec_path, offs, size, lengths)
            bad = np.flatnonzero(got != want)
            if bad.size:
                i = int(bad[0])
                raise RecordIOError(
                    f"{rec_path}: offset {int(offs[i])}: image label {got[i]:g} disagrees with its identity "
                    f"record ({want[i]:g})"
                )
            return np.array(images, dtype=object)

        def load_chunk(pos: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            data = tf.numpy_function(
                read_chunk,
                [tf.gather(offsets, pos), tf.gather(spans, pos), tf.gather(raw, tf.gather(labels, pos))],
                tf.string,
                stateful=False,
            )
            data.set_shape([None])
            return data, tf.gather(labels, pos)

        def epoch(e: tf.Tensor) -> tf.data.Dataset:
            order = tf.argsort(
                tf.random.stateless_uniform([n], seed=tf.stack([tf.constant(seed, tf.int64), e]))
            )
            return (
                tf.data.Dataset.from_tensor_slices(order)
                .batch(READ_CHUNK)
                .map(load_chunk, num_parallel_calls=AUTOTUNE, deterministic=det)
                .unbatch()
                .map(lambda d, y: (self._decode(d), y), num_parallel_calls=AUTOTUNE, deterministic=det)
                .batch(batch_size)
            )

        return epoch

    def _tfrecord_epoch(self, batch_size: int, seed: int):
        shards = self.listing.shards
        assert shards is not None
        files = tf.constant([str(f) for f in shards.files])
        # image index -> training label, -1 for images that are not training images of this split
        to_train = np.full(len(self.listing.labels), -1, dtype=np.int32)
        to_train[self.indices] = self.train_labels
        table = tf.constant(to_train)
        cycle = min(TFRECORD_CYCLE, len(shards.files))
        det, buffer = self.deterministic, max(1, self.shuffle_buffer)

        def parse(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            encoded, _, index = parse_examples(serialized)
            label = tf.gather(table, index)
            keep = label >= 0  # images of this split's training side only
            return tf.boolean_mask(encoded, keep), tf.boolean_mask(label, keep)

        def epoch(e: tf.Tensor) -> tf.data.Dataset:
            key = tf.stack([tf.constant(seed, tf.int64), e])
            order = tf.argsort(tf.random.stateless_uniform([len(shards.files)], seed=key))

            def permute(block: tf.Tensor, items: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
                data, labels = items
                block_key = tf.random.experimental.stateless_fold_in(key, block)
                perm = tf.argsort(tf.random.stateless_uniform(tf.shape(labels), seed=block_key))
                return tf.gather(data, perm), tf.gather(labels, perm)

            return (
                tf.data.Dataset.from_tensor_slices(tf.gather(files, order))
                .interleave(
                    tf.data.TFRecordDataset,
                    cycle_length=cycle,
                    num_parallel_calls=AUTOTUNE,
                    deterministic=det,
                )
                .batch(PARSE_BATCH)
                .map(parse, num_parallel_calls=AUTOTUNE, deterministic=det)
                .unbatch()
                # A seeded block shuffle, not Dataset.shuffle: its seed must be a Python int, but the order
                # here must be a function of (seed, epoch tensor) for exact resume.
                .batch(buffer)
                .enumerate()
                .map(permute)
                .prefetch(1)  # the next block is gathered while this one is decoded
                .unbatch()
                .map(lambda d, y: (self._decode(d), y), num_parallel_calls=AUTOTUNE, deterministic=det)
                .batch(batch_size)
            )

        return epoch

    # --- naming an image that fails to decode -------------------------------------------------------------

    def locate_undecodable(self, *, seed: int, batch_size: int, step: int) -> str | None:
        """The first training image that the stream cannot decode, described (folder: its path; .rec: file
        and offset; TFRecord: shard file, record number and image/index), or None when all decode.

        Runs only after the stream failed: TensorFlow's decode error does not say which image it was. For
        folders and .rec the search starts where training stopped (`step` global steps done) in that epoch's
        order, so the culprit is found in the first chunk; TFRecord shards are searched shard by shard."""
        if self.listing.kind == "tfrecord":
            chunks = self._tfrecord_chunks()
        else:
            spe = self.steps_per_epoch(batch_size)
            epoch, start = step // spe, (step % spe) * batch_size
            key = tf.constant([seed, epoch], tf.int64)
            order = tf.argsort(tf.random.stateless_uniform([self.num_examples], seed=key)).numpy()
            order = np.concatenate([order[start:], order[:start]])
            chunks = (
                self._indexed_chunk(order[i : i + LOCATE_CHUNK]) for i in range(0, len(order), LOCATE_CHUNK)
            )
        for encoded, names in chunks:
            bad = self._first_undecodable(encoded)
            if bad is not None:
                return names[bad]
        return None

    def _indexed_chunk(self, positions: np.ndarray) -> tuple[list[bytes], list[str]]:
        image_idx = self.indices[positions]
        names = [self.listing.describe(int(i)) for i in image_idx]
        if self.listing.kind == "folder":
            assert self.listing.locators is not None
            encoded = []
            for i in image_idx:
                try:
                    encoded.append((self.listing.source / self.listing.locators[i].decode()).read_bytes())
                except OSError:
                    encoded.append(b"")  # unreadable (gone since listing): decodes to nothing, so it is named
            return encoded, names
        return read_encoded(self.listing, image_idx), names

    def _tfrecord_chunks(self):
        shards = self.listing.shards
        assert shards is not None
        training = np.zeros(len(self.listing.labels), dtype=bool)
        training[self.indices] = True
        for path in shards.files:
            ds = tf.data.TFRecordDataset(str(path)).batch(LOCATE_CHUNK).map(parse_examples)
            record = 0
            for encoded, _, index in ds.as_numpy_iterator():
                keep = np.flatnonzero(training[index])
                names = [f"{path}: record {record + int(k)} (image/index {int(index[k])})" for k in keep]
                record += len(index)
                if len(keep):
                    yield [bytes(encoded[k]) for k in keep], names

    def _first_undecodable(self, encoded: list[bytes]) -> int | None:
        """Position of the first image of `encoded` that `decode_pixels` (as the stream runs it) fails on."""
        if not encoded:
            return None
        ds = (
            tf.data.Dataset.from_tensor_slices((tf.constant(encoded), tf.range(len(encoded))))
            .map(
                lambda e, k: (
                    decode_pixels(e, self.preprocessing, self.input_spec, jpeg_at_size=self.jpeg_at_size),
                    k,
                ),
                num_parallel_calls=AUTOTUNE,
                deterministic=True,
            )
            .ignore_errors()
            .map(lambda _x, k: k)
        )
        ok = set(ds.as_numpy_iterator())
        missing = [k for k in range(len(encoded)) if k not in ok]
        return missing[0] if missing else None


# TensorFlow errors that a streamed image which cannot be read, decoded or is not at the input size raises.
_DECODE_HINTS = ("Decode", "JPEG", "PNG", "image", "EnsureShape", "ReadFile", "No such file")
LOCATE_CHUNK = 512


def naming_undecodable_images(fit, stream: TrainStream | None, model: Any, *, seed: int, batch_size: int):
    """`fit` (Keras' `model.fit`) that, when a streamed image fails to decode, raises `DataError` naming the
    image instead of TensorFlow's error (which names no file). In-memory input: `fit` unchanged."""
    if stream is None:
        return fit

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fit(*args, **kwargs)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as exc:
            text = str(exc.message if hasattr(exc, "message") else exc)
            if stream_error_message(exc) is not None or not any(h in text for h in _DECODE_HINTS):
                raise
            step = int(model.optimizer.iterations.numpy())
            where = stream.locate_undecodable(seed=seed, batch_size=batch_size, step=step)
            if where is None:
                raise
            first = next((line.strip() for line in text.splitlines() if line.strip()), "")
            raise DataError(
                f"{where}: cannot be decoded as a {stream.input_spec.width}x{stream.input_spec.height} "
                f"image while streaming; fix or remove it ({first[:200]})"
            ) from exc

    return run


@dataclass(frozen=True)
class StreamingSplits(Splits):
    """`Splits` whose training images stream (`train_stream`); `x_train` holds only a small seeded sample
    (for the PCA baseline), `x_val`/`x_heldout` hold the (capped) evaluation images."""

    train_stream: TrainStream | None = None


def read_encoded(listing: Listing, indices: np.ndarray) -> list[bytes]:
    """Encoded bytes of some images (for the in-memory evaluation sets), in the order of `indices`."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return []
    if listing.kind == "folder":
        assert listing.locators is not None
        out = []
        for i in indices:
            path = listing.source / listing.locators[i].decode()
            try:
                out.append(path.read_bytes())
            except OSError as exc:
                raise DataError(f"{path}: cannot read ({exc})") from exc
        return out
    if listing.kind == "rec":
        assert listing.locators is not None
        spans = listing.spans[indices] if listing.spans is not None else None
        return read_images(listing.source, listing.locators[indices], spans=spans)[0]
    shards = listing.shards
    assert shards is not None
    wanted = np.zeros(len(listing.labels), dtype=bool)
    wanted[indices] = True
    mask = tf.constant(wanted)
    ds = (
        tf.data.Dataset.from_tensor_slices([str(f) for f in shards.files])
        .interleave(tf.data.TFRecordDataset, cycle_length=min(TFRECORD_CYCLE, len(shards.files)))
        .batch(PARSE_BATCH * 4)
        .map(parse_examples, num_parallel_calls=AUTOTUNE)
        .map(
            lambda e, _c, i: (tf.boolean_mask(e, tf.gather(mask, i)), tf.boolean_mask(i, tf.gather(mask, i)))
        )
        .unbatch()
    )
    found: dict[int, bytes] = {int(i): bytes(e) for e, i in ds.as_numpy_iterator()}
    missing = [int(i) for i in indices if int(i) not in found]
    if missing:
        raise DataError(f"{listing.source}: image/index {missing[0]} listed in labels.npy is in no shard")
    return [found[int(i)] for i in indices]


def _cap_identities(
    image_idx: np.ndarray, labels: np.ndarray, cap: int, rng: np.random.Generator
) -> np.ndarray:
    """Whole identities (in seeded order) until `cap` images; always at least two identities."""
    if len(image_idx) <= cap:
        return image_idx
    classes = rng.permutation(np.unique(labels[image_idx]))
    per_class = np.bincount(labels[image_idx], minlength=int(labels.max()) + 1)[classes]
    keep_n = max(2, int(np.searchsorted(np.cumsum(per_class), cap, side="right")))
    keep = np.isin(labels[image_idx], classes[:keep_n])
    return image_idx[keep]


def build_streaming_splits(config: RunConfig) -> StreamingSplits:
    """List the source once, split by identity, decode the (capped) evaluation images into memory."""
    listing = list_source(config.dataset, getattr(config, "streaming", False))
    names = listing.class_names
    heldout = choose_heldout(
        names,
        names=config.heldout_classes,
        count=config.heldout_count,
        fraction=config.heldout_fraction,
        seed=config.seed,
    )
    labels = listing.labels
    held_set = set(heldout)
    is_held = np.array([n in held_set for n in names], dtype=bool)
    train_classes = [n for n in names if n not in held_set]
    to_train = np.full(len(names), -1, dtype=np.int32)
    to_train[~is_held] = np.arange(len(train_classes), dtype=np.int32)
    to_held = np.full(len(names), -1, dtype=np.int32)
    to_held[is_held] = np.arange(len(heldout), dtype=np.int32)

    train_mask = ~is_held[labels]
    val_mask = val_split(labels, train_mask, config.val_fraction, config.seed)
    train_idx = np.flatnonzero(train_mask & ~val_mask)
    rng = np.random.default_rng(config.seed)
    all_val = np.flatnonzero(val_mask)
    val_idx = np.sort(rng.choice(all_val, size=min(MAX_VAL_IMAGES, len(all_val)), replace=False))
    all_held = np.flatnonzero(is_held[labels])
    held_idx = _cap_identities(all_held, labels, MAX_HELDOUT_IMAGES, rng)
    if len(train_idx) == 0:
        raise DataError(f"{config.dataset}: no training images left after the held-out and validation split")
    sample_idx = np.sort(rng.choice(train_idx, size=min(TRAIN_SAMPLE_IMAGES, len(train_idx)), replace=False))

    spec, prep = model_input(config)

    def decode(indices: np.ndarray, encoded: list[bytes] | None = None) -> np.ndarray:
        encoded = encoded if encoded is not None else read_encoded(listing, indices)
        return preprocess_encoded(encoded, prep, spec, names=[listing.describe(int(i)) for i in indices])

    sample = read_encoded(listing, sample_idx)
    fast = probe_jpeg_at_size(sample, spec)

    info = {
        "kind": listing.kind,
        "images_listed": len(labels),
        "identities": len(names),
        "train_images_streamed": len(train_idx),
        "val_images": {"total": len(all_val), "in_memory": len(val_idx)},
        "heldout_images": {"total": len(all_held), "in_memory": len(held_idx)},
        "heldout_identities": {
            "total": len(heldout),
            "evaluated": len(np.unique(labels[held_idx])) if len(held_idx) else 0,
        },
    }
    stream = TrainStream(
        listing,
        train_idx.astype(np.int64),
        to_train[labels[train_idx]],
        prep,
        spec,
        shuffle_buffer=getattr(config, "shuffle_buffer", 10_000),
        deterministic=getattr(config, "deterministic", True),
        jpeg_at_size=fast,
        info={**info, "decode": "jpeg-at-input-size fast path" if fast else "general (any format, resize)"},
    )
    return StreamingSplits(
        x_train=decode(sample_idx, sample),
        y_train=to_train[labels[sample_idx]],
        x_val=decode(val_idx),
        y_val=to_train[labels[val_idx]],
        x_heldout=decode(held_idx),
        y_heldout=to_held[labels[held_idx]],
        class_names=train_classes,
        heldout_class_names=heldout,
        input_spec=spec,
        preprocessing=prep,
        train_stream=stream,
    )


def stream_error_message(exc: BaseException) -> str | None:
    """The `RecordIOError` message inside a TensorFlow error raised by the stream (the .rec reader runs in
    a `tf.numpy_function`, so its exception arrives wrapped), or None for any other error."""
    if not isinstance(exc, tf.errors.OpError):
        return None
    text = str(exc.message if hasattr(exc, "message") else exc)
    marker = "RecordIOError: "
    if marker not in text:
        return None
    return text.split(marker, 1)[1].splitlines()[0].strip()
