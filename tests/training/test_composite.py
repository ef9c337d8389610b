"""Composite many-identity dataset: images are their parts side by side, samples are private to one identity,
held-out identities are balanced and disjoint, everything is seeded, and the written folder reads back."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from training.data.composite import (
    HELDOUT_FILE,
    PROVENANCE_FILE,
    balanced_heldout,
    build_composite_set,
    compose,
    identity_name,
    keep_identities,
    main,
    write_identity_folders,
)
from training.data.sources import DataError, ImageSet, load_digits_set, load_folder_set
from training.data.splits import split_identities


def tiny_base() -> ImageSet:
    """2 classes x 8 samples of 2x3 pixels; sample i is filled with the value 10 * i + 1 (all distinct)."""
    images = np.stack([np.full((2, 3), 10 * i + 1, dtype=np.uint8) for i in range(16)])
    labels = np.array([0, 1] * 8, dtype=np.int64)  # even samples are class "a", odd ones class "b"
    return ImageSet(images, labels, ["a", "b"], "tiny")


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return load_digits_set()


@pytest.fixture(scope="module")
def pairs(digits: ImageSet):
    return build_composite_set(digits, parts=2, per_identity=16, seed=0)


def test_compose_puts_samples_side_by_side() -> None:
    left = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    right = np.array([[5, 6], [7, 8]], dtype=np.uint8)
    assert compose([left, right]).tolist() == [[1, 2, 5, 6], [3, 4, 7, 8]]


def test_identity_names_join_class_names() -> None:
    assert identity_name(["3", "7"]) == "37"
    assert identity_name(["shirt", "bag"]) == "shirt_bag"


def test_tiny_composites_by_hand() -> None:
    # 4 identities (aa ab ba bb) = 8 slots; 8 samples per class / 4 slots per class = 2 private samples per
    # slot, so 2 x 2 = 4 combinations: per_identity=4 takes them all.
    comp = build_composite_set(tiny_base(), parts=2, per_identity=4, seed=0)
    ims = comp.image_set
    assert ims.class_names == ["aa", "ab", "ba", "bb"]
    assert comp.samples_per_slot == 2
    assert np.asarray(ims.images).shape == (16, 2, 6)
    for image, label, (left, right) in zip(ims.images, ims.labels, comp.parts, strict=True):
        assert (image[:, :3] == 10 * left + 1).all() and (image[:, 3:] == 10 * right + 1).all()
        # left sample's class is the identity's first letter, right sample's the second
        name = ims.class_names[label]
        assert "ab"[left % 2] == name[0] and "ab"[right % 2] == name[1]
    # each identity uses all 4 combinations of its 2 + 2 private samples exactly once
    for j in range(4):
        rows = comp.parts[ims.labels == j]
        assert len({tuple(r) for r in rows}) == 4
        assert len(set(rows[:, 0])) == 2 and len(set(rows[:, 1])) == 2


def test_digit_pair_image_is_two_digits_side_by_side(digits: ImageSet, pairs) -> None:
    ims = pairs.image_set
    assert len(ims.class_names) == 100 and ims.class_names[37] == "37"
    assert np.asarray(ims.images).shape == (1600, 8, 16)
    for i in range(0, len(ims.labels), 97):
        a, b = pairs.parts[i]
        assert np.array_equal(ims.images[i], np.hstack([digits.images[a], digits.images[b]]))
        name = ims.class_names[ims.labels[i]]
        assert name == digits.class_names[digits.labels[a]] + digits.class_names[digits.labels[b]]


def test_no_base_sample_serves_two_identities(pairs) -> None:
    owner: dict[int, int] = {}
    for (a, b), label in zip(pairs.parts, pairs.image_set.labels, strict=True):
        for sample in (a, b):
            assert owner.setdefault(int(sample), int(label)) == int(label)
    # sklearn digits: the rarest digit has 174 samples for 20 slots -> 8 private samples per slot
    assert pairs.samples_per_slot == 8


def test_heldout_identities_are_disjoint_and_built_from_unseen_samples(pairs) -> None:
    ims = pairs.image_set
    heldout = balanced_heldout(pairs.identity_parts, ims.class_names, 10, residues=3, seed=0)
    split = split_identities(ims.labels, ims.class_names, heldout, val_fraction=0.15, seed=0)
    assert set(split.heldout_classes) == set(heldout)
    assert not set(split.train_classes) & set(heldout)
    seen = set(pairs.parts[np.concatenate([split.train, split.val])].ravel().tolist())
    unseen = set(pairs.parts[split.heldout].ravel().tolist())
    assert seen and unseen and not seen & unseen


def test_balanced_heldout_has_every_digit_three_times_per_position(pairs) -> None:
    names = pairs.image_set.class_names
    heldout = balanced_heldout(pairs.identity_parts, names, 10, residues=3, seed=0)
    assert len(heldout) == 30
    residues = {(int(n[0]) + int(n[1])) % 10 for n in heldout}
    assert len(residues) == 3
    assert Counter(n[0] for n in heldout) == dict.fromkeys("0123456789", 3)
    assert Counter(n[1] for n in heldout) == dict.fromkeys("0123456789", 3)
    assert balanced_heldout(pairs.identity_parts, names, 10, residues=3, seed=0) == heldout
    assert balanced_heldout(pairs.identity_parts, names, 10, residues=3, seed=1) != heldout
    with pytest.raises(DataError, match="residues"):
        balanced_heldout(pairs.identity_parts, names, 10, residues=10, seed=0)


def test_same_seed_same_dataset_other_seed_other_dataset(digits: ImageSet, pairs) -> None:
    again = build_composite_set(digits, parts=2, per_identity=16, seed=0)
    other = build_composite_set(digits, parts=2, per_identity=16, seed=1)
    assert np.array_equal(again.parts, pairs.parts)
    assert np.array_equal(np.asarray(again.image_set.images), np.asarray(pairs.image_set.images))
    assert not np.array_equal(other.parts, pairs.parts)
    assert np.array_equal(other.image_set.labels, pairs.image_set.labels)


def test_impossible_requests_are_refused(digits: ImageSet) -> None:
    # 3 digits: each digit fills 300 slots but has at most 183 samples
    with pytest.raises(DataError, match="too few for private samples"):
        build_composite_set(digits, parts=3, per_identity=4)
    with pytest.raises(DataError, match="only 4 distinct combinations"):
        build_composite_set(tiny_base(), parts=2, per_identity=5)
    with pytest.raises(DataError, match="per_identity must be >= 2"):
        build_composite_set(tiny_base(), parts=2, per_identity=1)
    mixed = ImageSet(
        [np.zeros((2, 2), np.uint8), np.zeros((3, 3), np.uint8)], np.array([0, 1]), ["a", "b"], "m"
    )
    with pytest.raises(DataError, match="one size"):
        build_composite_set(mixed)


def test_written_folder_reads_back_identically(tmp_path: Path) -> None:
    comp = build_composite_set(tiny_base(), parts=2, per_identity=4, seed=3)
    out = tmp_path / "pairs"
    write_identity_folders(comp, out, ["ab"], {"seed": 3})
    loaded = load_folder_set(out)
    assert loaded.class_names == comp.image_set.class_names
    # files are written per identity in dataset order, so both sets list the same images in the same order
    assert np.array_equal(loaded.labels, comp.image_set.labels)
    assert np.array_equal(np.stack(loaded.images), np.asarray(comp.image_set.images))
    assert (out / HELDOUT_FILE).read_text() == "ab\n"
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["seed"] == 3 and provenance["heldout"] == ["ab"] and provenance["images"] == 16
    assert provenance["files"]["ab/0000.png"] == comp.parts[4].tolist()
    with pytest.raises(DataError, match="not empty"):
        write_identity_folders(comp, out, ["ab"], {})


def test_command_writes_digit_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digit-pairs"
    assert main(["--out", str(out), "--per-identity", "2", "--seed", "0"]) == 0
    heldout = (out / HELDOUT_FILE).read_text().strip().split(",")
    assert len(heldout) == 30 and heldout[0] == "05"
    assert len([d for d in out.iterdir() if d.is_dir()]) == 100
    assert "100 identities x 2 images (8, 16)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "x"), "--parts", "3"])
    assert exc.value.code == 2


def test_fewer_training_identities_keep_the_same_heldout_images(tmp_path: Path, pairs) -> None:
    full, small = tmp_path / "full", tmp_path / "small"
    assert main(["--out", str(full), "--per-identity", "4"]) == 0
    assert main(["--out", str(small), "--per-identity", "4", "--train-identities", "10"]) == 0
    heldout = (full / HELDOUT_FILE).read_text().strip().split(",")
    assert (small / HELDOUT_FILE).read_text().strip().split(",") == heldout
    names = sorted(d.name for d in small.iterdir() if d.is_dir())
    assert len(names) == 40 and set(heldout) <= set(names)
    a, b = load_folder_set(full), load_folder_set(small)
    for name in heldout:
        ka, kb = a.class_names.index(name), b.class_names.index(name)
        got = [im for im, y in zip(b.images, b.labels, strict=True) if y == kb]
        want = [im for im, y in zip(a.images, a.labels, strict=True) if y == ka]
        assert np.array_equal(np.stack(got), np.stack(want))
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--train-identities", "71"])


def test_keep_identities_relabels_in_dataset_order(pairs) -> None:
    sub = keep_identities(pairs, ["90", "01"])
    assert sub.image_set.class_names == ["01", "90"]
    assert sub.identity_parts == [(0, 1), (9, 0)]
    assert np.array_equal(np.bincount(sub.image_set.labels), [16, 16])
    first = np.flatnonzero(pairs.image_set.labels == 1)[0]
    assert np.array_equal(sub.image_set.images[0], pairs.image_set.images[first])
    assert np.array_equal(sub.parts[0], pairs.parts[first])
    with pytest.raises(DataError, match="unknown identities x"):
        keep_identities(pairs, ["x"])


def test_builtin_digit_pairs_equals_the_written_folder_and_holds_out_its_balanced_30(tmp_path: Path) -> None:
    # `--dataset digit-pairs` needs no folder: the same images and held-out list as the command writes.
    from training.config import RunConfig
    from training.data import load_dataset, split_indices

    builtin = load_dataset("digit-pairs")
    out = tmp_path / "digit-pairs"
    assert main(["--out", str(out), "--seed", "0"]) == 0
    written = load_folder_set(out)
    assert builtin.class_names == written.class_names
    assert np.array_equal(np.asarray(builtin.images), np.stack(written.images))
    assert builtin.suggested_heldout == (out / HELDOUT_FILE).read_text().strip().split(",")
    split = split_indices(RunConfig(dataset="digit-pairs"), builtin)
    assert split.heldout_classes == builtin.suggested_heldout and len(split.train_classes) == 70
    # An explicit choice still wins over the suggestion.
    assert split_indices(RunConfig(dataset="digit-pairs", heldout_count=10), builtin).heldout_classes != (
        builtin.suggested_heldout
    )
