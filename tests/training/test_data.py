"""Dataset sources, identity-disjoint splits and the shared preprocessing path of the training data."""

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle.preprocess import preprocess_pil
from training.config import RunConfig
from training.data import (
    DataError,
    build_splits,
    choose_heldout,
    load_dataset,
    model_input,
    split_identities,
    train_dataset,
)
from training.data.sources import load_digits_set, load_folder_set, load_idx_set


def _write_idx(path: Path, array: np.ndarray, magic_dims: int, gz: bool) -> None:
    header = (0x0800 | magic_dims).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    for part, n, gz in (("train", 30, True), ("t10k", 12, False)):
        _write_idx(tmp_path / f"{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 6, 5)), 3, gz)
        _write_idx(tmp_path / f"{part}-labels-idx1-ubyte", np.arange(n) % 3, 1, gz)
    return tmp_path


@pytest.fixture
def face_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    for person, suffix, mode in (("alice", ".pgm", "L"), ("bob", ".png", "RGB"), ("carol", ".jpg", "RGB")):
        (root / person).mkdir(parents=True)
        for i in range(4):
            shape = (20 + i, 18, 3) if mode == "RGB" else (20 + i, 18)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                root / person / f"{i}{suffix}"
            )
    (root / "alice" / "notes.txt").write_text("not an image, ignored")
    return root


def test_digits_become_uint8_images_with_names():
    data = load_digits_set()
    assert data.images.shape == (1797, 8, 8) and data.images.dtype == np.uint8
    assert data.images.max() == 255 and data.images.min() == 0
    assert data.class_names == [str(i) for i in range(10)]


def test_idx_folder_pools_gz_and_raw_parts(idx_folder):
    data = load_idx_set(idx_folder)
    assert data.images.shape == (42, 6, 5)
    assert data.class_names == ["0", "1", "2"]
    assert np.bincount(data.labels).tolist() == [14, 14, 14]


def test_idx_prefix_reads_one_part(idx_folder):
    data = load_dataset(str(idx_folder / "t10k"))
    assert data.images.shape == (12, 6, 5)


def test_idx_with_wrong_magic_names_the_file(tmp_path):
    _write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((2, 3, 3)), 1, False)
    _write_idx(tmp_path / "x-labels-idx1-ubyte", np.zeros(2), 1, False)
    with pytest.raises(DataError, match="x-images-idx3-ubyte: IDX magic"):
        load_idx_set(tmp_path)


def test_folder_reads_pgm_png_jpeg_gray_and_rgb(face_folder):
    gray = load_folder_set(face_folder, "L")
    assert gray.class_names == ["alice", "bob", "carol"]
    assert len(gray.images) == 12 and gray.images[5].ndim == 2
    rgb = load_folder_set(face_folder, "RGB")
    assert rgb.images[0].shape == (20, 18, 3)


def test_unreadable_image_is_named(face_folder):
    bad = face_folder / "bob" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken\.png: unreadable image"):
        load_folder_set(face_folder)


def test_empty_class_folder_is_named(face_folder):
    (face_folder / "dave").mkdir()
    with pytest.raises(DataError, match="dave: class folder has no images"):
        load_folder_set(face_folder)


def test_fewer_than_two_classes_is_rejected(tmp_path):
    (tmp_path / "only").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "only" / "a.png")
    with pytest.raises(DataError, match="need at least 2"):
        load_folder_set(tmp_path)


def test_heldout_by_name_count_and_fraction_is_seeded():
    names = [f"id{i}" for i in range(10)]
    assert choose_heldout(names, names=["id7", "id2"], count=None, fraction=0.3, seed=0) == ["id2", "id7"]
    by_count = choose_heldout(names, names=None, count=4, fraction=0.3, seed=5)
    assert len(by_count) == 4 and by_count == choose_heldout(names, names=None, count=4, fraction=0.0, seed=5)
    assert by_count != choose_heldout(names, names=None, count=4, fraction=0.0, seed=6)
    assert len(choose_heldout(names, names=None, count=None, fraction=0.3, seed=0)) == 3


def test_unknown_heldout_name_and_too_few_training_classes_are_rejected():
    names = ["a", "b", "c"]
    with pytest.raises(DataError, match="--heldout-classes: unknown class"):
        choose_heldout(names, names=["z"], count=None, fraction=0.0, seed=0)
    with pytest.raises(DataError, match="fewer than 2 to train on"):
        choose_heldout(names, names=None, count=2, fraction=0.0, seed=0)


def test_splits_are_identity_disjoint_and_validation_is_per_identity():
    labels = np.repeat(np.arange(5), 10)
    idx = split_identities(labels, list("abcde"), ["d"], val_fraction=0.2, seed=0)
    assert idx.train_classes == ["a", "b", "c", "e"] and idx.heldout_classes == ["d"]
    assert set(labels[idx.heldout]) == {3}
    assert set(labels[idx.train]) == set(labels[idx.val]) == {0, 1, 2, 4}
    assert not set(idx.train) & set(idx.val)
    assert np.bincount(labels[idx.val], minlength=5).tolist() == [2, 2, 2, 0, 2]
    again = split_identities(labels, list("abcde"), ["d"], val_fraction=0.2, seed=0)
    np.testing.assert_array_equal(idx.val, again.val)


def test_build_splits_on_digits_holds_out_789_and_relabels_training_classes():
    splits = build_splits(RunConfig(heldout_classes=["7", "8", "9"], val_fraction=0.2))
    assert splits.class_names == [str(i) for i in range(7)]
    assert splits.heldout_class_names == ["7", "8", "9"]
    assert splits.x_train.shape[1:] == (8, 8, 1) and splits.x_train.dtype == np.float32
    assert set(splits.y_train) == set(range(7)) and set(splits.y_heldout) == {0, 1, 2}
    assert len(splits.x_train) + len(splits.x_val) + len(splits.x_heldout) == 1797
    assert splits.x_train.min() >= -1.0 and splits.x_train.max() <= 1.0


def test_training_input_equals_the_service_preprocessing_of_the_same_file(face_folder):
    config = RunConfig(dataset=str(face_folder), heldout_count=0, val_fraction=0.0, image_size=16)
    splits = build_splits(config)
    spec, prep = model_input(config)
    with Image.open(face_folder / "alice" / "0.pgm") as img:
        expected = preprocess_pil(img, prep, spec)
    np.testing.assert_array_equal(splits.x_train[0], expected)


def test_epoch_order_depends_only_on_seed_and_epoch():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10, dtype=np.int32)
    full = [b[1].numpy().tolist() for b in train_dataset(x, y, batch_size=4, seed=3, epochs=3)]
    resumed = [
        b[1].numpy().tolist() for b in train_dataset(x, y, batch_size=4, seed=3, epochs=3, initial_epoch=2)
    ]
    assert len(full) == 9 and resumed == full[6:]
    assert sorted(np.concatenate(full[:3]).tolist()) == list(range(10))
    assert full[:3] != full[3:6]
