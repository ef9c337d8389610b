"""Streamed training formats: RecordIO (.rec/.idx), TFRecord shards, streamed folders; each round-trips,
preprocesses as the service does, splits by identity, and trains one epoch through the CLI."""

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from typer.testing import CliRunner

from bundle.manifest import InputSpec, Preprocessing
from bundle.preprocess import preprocess_pil
from training.cli import app
from training.config import ConfigError, RunConfig
from training.data import build_splits
from training.data.recordio import (
    MAGIC,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    encode_record,
    list_rec,
    pack,
    read_images,
    unpack,
    write_insightface_rec,
)
from training.data.sources import DataError
from training.data.streaming import (
    build_streaming_splits,
    decode_and_preprocess,
    decode_pixels,
    list_source,
    preprocess_encoded,
    probe_jpeg_at_size,
    val_split,
)
from training.data.tfrecord import list_folder, read_shard_set, write_shards
from training.model import PixelNormalization

runner = CliRunner()
IDENTITIES, PER_IDENTITY, SIZE = 6, 8, 16


def _jpeg(pixels: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _face(k: int, j: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """An RGB image whose layout depends on the identity k (learnable) plus per-image noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack(
        [
            128 + 100 * np.sin((xx + 3 * k) / 3.0),
            128 + 100 * np.cos((yy * (k + 1)) / 5.0),
            np.full((size, size), 40.0 * k),
        ],
        axis=-1,
    )
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def identity_images():
    rng = np.random.default_rng(0)
    return [[_jpeg(_face(k, j, rng)) for j in range(PER_IDENTITY)] for k in range(IDENTITIES)]


@pytest.fixture
def face_folder(tmp_path, identity_images):
    root = tmp_path / "faces"
    for k, images in enumerate(identity_images):
        (root / f"id{k:02d}").mkdir(parents=True)
        for j, data in enumerate(images):
            (root / f"id{k:02d}" / f"{j:03d}.jpg").write_bytes(data)
    return root


# --- RecordIO ---


def test_record_framing_is_dmlc_recordio_byte_for_byte():
    magic = struct.pack("<I", MAGIC)
    assert encode_record(b"abcde") == magic + struct.pack("<I", 5) + b"abcde\0\0\0"
    assert encode_record(b"") == magic + struct.pack("<I", 0)
    # The magic word at a 4-aligned position splits the record: cflag 1 (start) then 3 (end), magic dropped.
    payload = b"1234" + magic + b"xy"
    assert encode_record(payload) == (
        magic
        + struct.pack("<I", (1 << 29) | 4)
        + b"1234"
        + magic
        + struct.pack("<I", (3 << 29) | 2)
        + b"xy\0\0"
    )
    # Unaligned magic bytes are just data.
    assert encode_record(b"12" + magic) == magic + struct.pack("<I", 6) + b"12" + magic + b"\0\0"


def test_irheader_pack_unpack_matches_mxnet_layout():
    packed = pack(IRHeader(0, 7.0, 42, 0), b"IMG")
    assert packed == struct.pack("<IfQQ", 0, 7.0, 42, 0) + b"IMG"
    header, body = unpack(packed)
    assert (header.flag, header.label, header.id, body) == (0, 7.0, 42, b"IMG")
    packed = pack(IRHeader(0, np.array([3.0, 9.0]), 5, 0), b"IMG")
    assert packed[:24] == struct.pack("<IfQQ", 2, 0.0, 5, 0)  # flag = label size, header label 0
    header, body = unpack(packed)
    assert header.flag == 2 and header.label.tolist() == [3.0, 9.0] and body == b"IMG"
    assert header.label_value() == 3.0


def test_records_with_embedded_magic_round_trip(tmp_path):
    magic = struct.pack("<I", MAGIC)
    payloads = [b"plain", magic * 3, b"abcd" + magic + b"efgh" + magic, b"", bytes(range(256)) * 3]
    with RecordIOWriter(tmp_path / "x.rec") as writer:
        for key, p in enumerate(payloads):
            writer.write(key, p)
    reader = RecordIOReader(tmp_path / "x.rec")
    assert [reader.read(k) for k in range(len(payloads))] == payloads
    assert reader.check(image_records=False) == len(payloads)
    # Without an .idx, the file is walked sequentially and gives the same records.
    (tmp_path / "x.idx").unlink()
    assert [p for _, p in RecordIOReader(tmp_path / "x.rec").iter_records()] == payloads


@pytest.mark.parametrize("label_array", [False, True])
def test_insightface_layout_lists_identities_from_their_records(tmp_path, identity_images, label_array):
    rec = tmp_path / "train.rec"
    assert write_insightface_rec(rec, identity_images, label_array=label_array) == (
        IDENTITIES * PER_IDENTITY,
        IDENTITIES,
    )
    reader = RecordIOReader(rec)
    head0 = reader.header(0)
    n = IDENTITIES * PER_IDENTITY
    assert head0.flag == 2 and head0.label.tolist() == [n + 1, n + 1 + IDENTITIES]
    assert reader.header(n + 2).label.tolist() == [1 + PER_IDENTITY, 1 + 2 * PER_IDENTITY]  # identity 1
    listing = list_rec(rec)
    assert listing.layout == "insightface"
    assert listing.labels.tolist() == np.repeat(np.arange(IDENTITIES), PER_IDENTITY).tolist()
    images, raw = read_images(rec, listing.offsets)
    assert images == [b for ident in identity_images for b in ident]
    assert raw.tolist() == listing.labels.astype(float).tolist()


def test_one_read_per_record_equals_the_validating_reader(tmp_path, identity_images):
    magic = struct.pack("<I", MAGIC)
    # The first image carries the magic word at an aligned position of its payload (24-byte IRHeader + 8 +
    # 4 label bytes ahead of it): written as continuation parts, which the one-read path must hand over.
    odd = identity_images[0][0][:8] + magic + identity_images[0][0][8:]
    sets = [[odd, *identity_images[0][1:]], *identity_images[1:]]
    for label_array in (False, True):
        rec = tmp_path / f"t{label_array}.rec"
        write_insightface_rec(rec, sets, label_array=label_array)
        listing = list_rec(rec)
        assert listing.spans is not None and listing.spans.dtype == np.int32
        fast = read_images(rec, listing.offsets, spans=listing.spans)
        slow = read_images(rec, listing.offsets)
        assert fast[0] == slow[0] == [b for ident in sets for b in ident]
        np.testing.assert_array_equal(fast[1], slow[1])


def test_flat_rec_without_header_record_reads_labels_per_record(tmp_path, identity_images):
    rec = tmp_path / "flat.rec"
    with RecordIOWriter(rec) as writer:
        key = 0
        for k, images in enumerate(identity_images):
            for data in images:
                writer.write(key, pack(IRHeader(0, float(10 * k + 5), key, 0), data))
                key += 1
    listing = list_rec(rec)
    assert listing.layout == "flat"
    assert listing.class_names == [str(10 * k + 5) for k in range(IDENTITIES)]
    assert listing.labels.tolist() == np.repeat(np.arange(IDENTITIES), PER_IDENTITY).tolist()


def test_truncated_rec_is_rejected_naming_file_and_offset(tmp_path, identity_images):
    rec = tmp_path / "train.rec"
    write_insightface_rec(rec, identity_images)
    data = rec.read_bytes()
    rec.write_bytes(data[: len(data) - 10])
    with pytest.raises(RecordIOError, match=r"train\.rec.*offset \d+.*truncated"):
        list_rec(rec)


def test_corrupt_magic_is_rejected_naming_file_and_offset(tmp_path, identity_images):
    rec = tmp_path / "train.rec"
    write_insightface_rec(rec, identity_images)
    reader = RecordIOReader(rec)
    offset = reader.offset_of(3)
    data = bytearray(rec.read_bytes())
    data[offset : offset + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=rf"train\.rec: offset {offset}: magic 0x00000000"):
        RecordIOReader(rec).read(3)
    with pytest.raises(RecordIOError, match=rf"offset {offset}"):
        RecordIOReader(rec).check()
    # A broken length word (record running past the end) is named too.
    data = bytearray(rec.read_bytes())
    data[offset : offset + 8] = struct.pack("<II", MAGIC, (1 << 29) - 1)
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=rf"offset {offset}: record of \d+ bytes runs past the end"):
        read_images(rec, np.array([offset]))


def test_bad_idx_line_is_named(tmp_path, identity_images):
    rec = tmp_path / "train.rec"
    write_insightface_rec(rec, identity_images)
    (tmp_path / "train.idx").write_text("0\t0\n1\tabc\n")
    with pytest.raises(RecordIOError, match=r"train\.idx: line 2"):
        list_rec(rec)


# --- TFRecord shards and folder listing ---


def test_tfrecord_shards_round_trip(tmp_path, identity_images):
    items = [(b, k) for k, ident in enumerate(identity_images) for b in ident]
    shards = write_shards(
        tmp_path / "shards",
        iter(items),
        num_images=len(items),
        class_names=[f"id{k}" for k in range(IDENTITIES)],
        shard_size=20,
    )
    assert [f.name for f in shards.files] == [f"shard-{i:05d}-of-00003.tfrecord" for i in range(3)]
    assert shards.counts == [20, 20, 8]
    again = read_shard_set(tmp_path / "shards")
    assert again.labels.tolist() == [k for _, k in items]
    listing = list_source(str(tmp_path / "shards"))
    from training.data.streaming import read_encoded

    picked = np.array([47, 0, 21])
    assert read_encoded(listing, picked) == [items[i][0] for i in picked]


def test_folder_listing_holds_paths_and_labels_not_pixels(face_folder):
    listing = list_folder(face_folder)
    assert listing.paths.dtype.kind == "S"
    assert listing.paths[0] == b"id00/000.jpg"
    assert listing.labels.tolist() == np.repeat(np.arange(IDENTITIES), PER_IDENTITY).tolist()


def test_streaming_refuses_formats_tensorflow_cannot_decode(face_folder):
    Image.new("L", (8, 8)).save(face_folder / "id00" / "x.pgm")
    with pytest.raises(DataError, match=r"x\.pgm.*--streaming"):
        list_source(str(face_folder), streaming=True)


# --- preprocessing: the TF path against the bundle's ---


def _tf_pre(data: bytes, prep: Preprocessing, spec: InputSpec) -> np.ndarray:
    return decode_and_preprocess(tf.constant(data), prep, spec).numpy()


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("kind", ["jpeg-rgb", "jpeg-gray", "png-rgba", "png-gray"])
def test_tf_preprocessing_equals_the_bundle_exactly_without_resize(mode, kind):
    rng = np.random.default_rng(1)
    rgb = _face(3, 0, rng, size=24)
    data = {
        "jpeg-rgb": lambda: _jpeg(rgb),
        "jpeg-gray": lambda: _jpeg(rgb[..., 0]),
        "png-rgba": lambda: _png(np.concatenate([rgb, rng.integers(0, 255, (24, 24, 1), np.uint8)], -1)),
        "png-gray": lambda: _png(rgb[..., 1]),
    }[kind]()
    spec = InputSpec(height=24, width=24, channels=3 if mode == "RGB" else 1, layout="NHWC")
    prep = Preprocessing(color_mode=mode, mean=[0.5], std=[0.5])
    with Image.open(io.BytesIO(data)) as img:
        expected = preprocess_pil(img, prep, spec)
        pixels = np.asarray(img.convert(mode))
    # Pixels: bit for bit (general path, and the JPEG fast path where it applies) ...
    got = decode_pixels(tf.constant(data), prep, spec).numpy()
    np.testing.assert_array_equal(got, pixels.reshape(got.shape))
    if kind.startswith("jpeg"):
        assert probe_jpeg_at_size([data], spec)
        fast = decode_pixels(tf.constant(data), prep, spec, jpeg_at_size=True).numpy()
        np.testing.assert_array_equal(fast, got)
    else:
        assert not probe_jpeg_at_size([data], spec)
    # ... and the model input within float32 rounding of the fused multiply-add.
    np.testing.assert_allclose(_tf_pre(data, prep, spec), expected, rtol=0, atol=1e-6)


def test_tf_resize_stays_within_two_grey_levels_of_pillow():
    rng = np.random.default_rng(2)
    prep = Preprocessing(color_mode="RGB", scale=1.0, mean=[0.0], std=[1.0])
    spec = InputSpec(height=28, width=28, channels=3, layout="NHWC")
    worst, mean = 0.0, []
    for k in range(4):
        data = _jpeg(_face(k, 0, rng, size=64 + 8 * k))
        with Image.open(io.BytesIO(data)) as img:
            expected = preprocess_pil(img, prep, spec)
        diff = np.abs(_tf_pre(data, prep, spec) - expected)
        worst = max(worst, float(diff.max()))
        mean.append(float(diff.mean()))
    # Measured: max 1-2 grey levels, mean < 0.3 (Pillow resamples in fixed point, TF in float).
    assert worst <= 2.0
    assert np.mean(mean) < 0.5


def test_in_memory_evaluation_images_use_the_bundle_preprocessing(identity_images):
    spec = InputSpec(height=SIZE, width=SIZE, channels=3, layout="NHWC")
    prep = Preprocessing(color_mode="RGB", mean=[0.5], std=[0.5])
    got = preprocess_encoded(identity_images[0][:2], prep, spec)
    with Image.open(io.BytesIO(identity_images[0][1])) as img:
        np.testing.assert_array_equal(got[1], preprocess_pil(img, prep, spec))
    with pytest.raises(DataError, match=r"broken\.jpg: unreadable"):
        preprocess_encoded([b"not an image"], prep, spec, names=["broken.jpg"])


# --- splits and the training stream ---


def test_val_split_is_per_identity_and_keeps_one_training_image():
    labels = np.repeat(np.arange(5), [1, 2, 10, 20, 7]).astype(np.int32)
    mask = val_split(labels, np.ones(len(labels), bool), 0.3, seed=0)
    per_class = np.bincount(labels[mask], minlength=5)
    assert per_class.tolist() == [0, 1, 3, 6, 2]
    assert np.array_equal(mask, val_split(labels, np.ones(len(labels), bool), 0.3, seed=0))
    assert not np.array_equal(mask, val_split(labels, np.ones(len(labels), bool), 0.3, seed=1))


def _rec_dataset(tmp_path, identity_images) -> str:
    write_insightface_rec(tmp_path / "train.rec", identity_images)
    return str(tmp_path / "train.rec")


def _shard_dataset(tmp_path, identity_images) -> str:
    items = [(b, k) for k, ident in enumerate(identity_images) for b in ident]
    order = np.random.default_rng(0).permutation(len(items))
    write_shards(
        tmp_path / "shards",
        (items[i] for i in order),
        num_images=len(items),
        class_names=[f"id{k}" for k in range(IDENTITIES)],
        shard_size=16,
    )
    return str(tmp_path / "shards")


@pytest.mark.parametrize("kind", ["rec", "tfrecord", "folder"])
def test_streamed_splits_are_identity_disjoint_and_stream_every_training_image(
    kind, tmp_path, identity_images, face_folder
):
    dataset = {
        "rec": lambda: _rec_dataset(tmp_path, identity_images),
        "tfrecord": lambda: _shard_dataset(tmp_path, identity_images),
        "folder": lambda: str(face_folder),
    }[kind]()
    config = RunConfig(
        dataset=dataset,
        streaming=kind == "folder",
        image_size=SIZE,
        color_mode="RGB",
        heldout_count=2,
        val_fraction=0.25,
        batch_size=5,
        seed=3,
    )
    splits = build_splits(config)
    stream = splits.train_stream
    assert stream is not None and stream.info["kind"] == kind
    assert stream.jpeg_at_size  # 16x16 JPEGs at --image-size 16: the fast path
    assert set(splits.class_names).isdisjoint(splits.heldout_class_names)
    assert len(splits.class_names) == IDENTITIES - 2
    assert len(splits.x_heldout) == 2 * PER_IDENTITY and len(splits.x_val) == 2 * (IDENTITIES - 2)
    assert stream.num_examples == (IDENTITIES - 2) * (PER_IDENTITY - 2)
    steps = stream.steps_per_epoch(5)
    ds = list(stream.dataset(batch_size=5, seed=3, epochs=2).as_numpy_iterator())
    assert len(ds) == 2 * steps
    first = np.concatenate([y for _, y in ds[:steps]])
    second = np.concatenate([y for _, y in ds[steps:]])
    assert sorted(first.tolist()) == sorted(stream.train_labels.tolist()) == sorted(second.tolist())
    # uint8 pixels: the host only decodes; the model normalises them in its graph (training/model.py).
    assert ds[0][0].shape[1:] == (SIZE, SIZE, 3) and ds[0][0].dtype == np.uint8
    # A resumed run (initial_epoch 1) sees exactly the second epoch of the uninterrupted run.
    resumed = list(stream.dataset(batch_size=5, seed=3, epochs=2, initial_epoch=1).as_numpy_iterator())
    for (xa, ya), (xb, yb) in zip(resumed, ds[steps:], strict=True):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)
    # Each streamed image is its label's image: equal to the bundle preprocessing of one of its files.
    by_label = {}
    for k, name in enumerate(splits.class_names):
        original = int(name.removeprefix("id")) if name.startswith("id") else int(name)
        by_label[k] = preprocess_encoded(identity_images[original], splits.preprocessing, splits.input_spec)
    x0, y0 = ds[0]
    x0 = PixelNormalization(splits.preprocessing, splits.input_spec)(tf.constant(x0)).numpy()
    for x, y in zip(x0, y0, strict=True):
        assert min(float(np.abs(x - ref).max()) for ref in by_label[int(y)]) <= 1e-6


def test_mislabelled_rec_image_is_caught_while_streaming(tmp_path, identity_images):
    rec = tmp_path / "train.rec"
    write_insightface_rec(rec, identity_images)
    reader = RecordIOReader(rec)
    offset = reader.offset_of(1)
    data = bytearray(rec.read_bytes())
    data[offset + 8 + 4 : offset + 8 + 8] = struct.pack("<f", 4.0)  # image 1 claims identity 4
    rec.write_bytes(bytes(data))
    config = RunConfig(dataset=str(rec), image_size=SIZE, color_mode="RGB", heldout_count=0, val_fraction=0.0)
    stream = build_streaming_splits(config).train_stream
    with pytest.raises(tf.errors.OpError, match=rf"offset {offset}: image label 4 disagrees"):
        list(stream.dataset(batch_size=64, seed=0, epochs=1).as_numpy_iterator())


def test_streaming_option_needs_a_folder():
    with pytest.raises(ConfigError, match="--streaming"):
        RunConfig.from_options(dataset="digits", streaming=True)


# --- the CLI: pack, then train one epoch on every format ---

TINY = [
    "--epochs",
    "1",
    "--image-size",
    str(SIZE),
    "--color-mode",
    "RGB",
    "--width",
    "4",
    "--feature-dim",
    "4",
]
TINY += ["--heldout-count", "2", "--batch-size", "8", "--quiet"]


@pytest.mark.parametrize("fmt", ["tfrecord", "rec"])
def test_pack_command_writes_a_trainable_set(fmt, tmp_path, face_folder, identity_images):
    out = tmp_path / f"packed-{fmt}"
    result = runner.invoke(
        app,
        ["pack", str(face_folder), "--out", str(out), "--format", fmt, "--shard-size", "20", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert f"{IDENTITIES * PER_IDENTITY} images of {IDENTITIES} identities" in result.output
    if fmt == "rec":
        listing = list_rec(out / "train.rec")
        assert read_images(out / "train.rec", listing.offsets)[0] == [b for i in identity_images for b in i]
    else:
        shards = read_shard_set(out)
        assert shards.num_images == IDENTITIES * PER_IDENTITY and len(shards.files) == 3
    again = runner.invoke(app, ["pack", str(face_folder), "--out", str(out), "--no-progress"])
    assert again.exit_code == 2 and "--out" in again.output


def test_pack_rejects_an_unknown_format(tmp_path, face_folder):
    result = runner.invoke(app, ["pack", str(face_folder), "--out", str(tmp_path / "o"), "--format", "lmdb"])
    assert result.exit_code == 2 and "--format" in result.output


@pytest.mark.parametrize("kind", ["rec", "tfrecord", "folder"])
def test_train_one_epoch_through_the_cli_on_each_format(kind, tmp_path, identity_images, face_folder):
    dataset = {
        "rec": lambda: _rec_dataset(tmp_path, identity_images),
        "tfrecord": lambda: _shard_dataset(tmp_path, identity_images),
        "folder": lambda: str(face_folder),
    }[kind]()
    out = tmp_path / "run"
    extra = ["--streaming"] if kind == "folder" else []
    result = runner.invoke(app, ["train", "--dataset", dataset, "--out", str(out), *TINY, *extra])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["streaming"]["kind"] == kind
    assert summary["num_train"] == summary["streaming"]["train_images_streamed"] > 0
    assert summary["streaming"]["images_listed"] == IDENTITIES * PER_IDENTITY
    assert np.isfinite(summary["final"]["loss"])
    assert (out / "embedding.keras").is_file()
    if kind == "rec":
        # A streamed run is evaluated like any other: its split is rebuilt from the listing.
        result = runner.invoke(
            app, ["evaluate", str(out), "--no-softmax", "--pca-components", "4", "--trials", "2"]
        )
        assert result.exit_code == 0, result.output
        report = json.loads((out / "evaluation.json").read_text())
        assert len(report["heldout_classes"]) == 2 and report["results"][0]["name"] == "softmax+center"


def test_corrupt_rec_fails_the_cli_naming_file_and_offset(tmp_path, identity_images):
    dataset = Path(_rec_dataset(tmp_path, identity_images))
    data = dataset.read_bytes()
    dataset.write_bytes(data[:-40])
    result = runner.invoke(app, ["train", "--dataset", str(dataset), "--out", str(tmp_path / "run"), *TINY])
    assert result.exit_code == 2
    assert "train.rec" in result.output and "offset" in result.output


def test_streamed_run_resumes_to_the_uninterrupted_result(tmp_path, identity_images):
    dataset = _rec_dataset(tmp_path, identity_images)
    args = list(TINY)
    args[args.index("--epochs") + 1] = "2"
    whole = runner.invoke(app, ["train", "--dataset", dataset, "--out", str(tmp_path / "whole"), *args])
    assert whole.exit_code == 0, whole.output
    first = runner.invoke(app, ["train", "--dataset", dataset, "--out", str(tmp_path / "split"), *TINY])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["train", "--out", str(tmp_path / "split"), "--resume", "--epochs", "2"])
    assert again.exit_code == 0, again.output
    a = np.load(tmp_path / "whole" / "centers.npy")
    b = np.load(tmp_path / "split" / "centers.npy")
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_record_corrupted_mid_stream_fails_the_cli_naming_file_and_offset(tmp_path, identity_images):
    rec = Path(_rec_dataset(tmp_path, identity_images))
    offset = RecordIOReader(rec).offset_of(5)
    data = bytearray(rec.read_bytes())
    data[offset + 8 + 4 : offset + 8 + 8] = struct.pack("<f", 3.0)  # listing is fine, the stream is not
    rec.write_bytes(bytes(data))
    result = runner.invoke(app, ["train", "--dataset", str(rec), "--out", str(tmp_path / "run"), *TINY])
    assert result.exit_code == 2, result.output
    assert (
        f"train.rec: offset {offset}: image label 3 disagrees with its identity record (0)" in result.output
    )


def test_streamed_batches_are_augmented_training_only_and_seeded(tmp_path, face_folder):
    # The same seeded warp as the in-memory input: epoch e's augmented batches depend on (seed, e) only.
    out = tmp_path / "run"
    aug = ["--augment-rotation", "15", "--augment-translate", "0.1"]
    result = runner.invoke(
        app, ["train", "--dataset", str(face_folder), "--streaming", "--out", str(out), *TINY, *aug]
    )
    assert result.exit_code == 0, result.output
    from training.config import RunConfig
    from training.data import build_splits
    from training.data.augment import augmentation_from_config

    config = RunConfig.load(out / "config.json")
    splits = build_splits(config)
    stream = splits.train_stream
    augment = augmentation_from_config(config, splits.preprocessing)
    plain = next(iter(stream.dataset(batch_size=8, seed=0, epochs=1)))[0].numpy()
    warped = [next(iter(stream.dataset(batch_size=8, seed=0, epochs=1, augment=augment)))[0].numpy()]
    warped.append(next(iter(stream.dataset(batch_size=8, seed=0, epochs=1, augment=augment)))[0].numpy())
    assert np.array_equal(warped[0], warped[1]) and not np.allclose(warped[0], plain)
