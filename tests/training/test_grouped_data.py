"""Grouped identity trees read from folders and zips (Omniglot layout), and held-out splits by whole group."""

import io
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from training.config import ConfigError, RunConfig
from training.data import DataError, build_splits, load_dataset, split_indices
from training.data.grouped import load_grouped_set
from training.data.splits import choose_heldout_groups
from training.workflows.manifest_recipe import config_from_recipe, recipe_of

OMNIGLOT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot"


def _png(value: int, size: int = 10) -> bytes:
    """A distinct gray PNG per value (its pixels encode it), so content hashes differ between values."""
    pixels = np.full((size, size), 255, dtype=np.uint8)
    pixels.flat[: value % (size * size)] = (value * 37) % 200
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def _write_zip(path: Path, split: str, tree: dict[str, dict[str, list[int]]]) -> Path:
    """`tree[group][identity]` = image values; members `<split>/<group>/<identity>/<k>.png`."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{split}/", "")
        for group, identities in tree.items():
            for identity, values in identities.items():
                for k, v in enumerate(values):
                    zf.writestr(f"{split}/{group}/{identity}/{k:02d}.png", _png(v))
        zf.writestr(f"__MACOSX/{split}/._junk.png", b"resource fork, not an image")
    return path


# Group "Shared" is in both zips with the same bytes (like Omniglot's Greek and Latin).
SHARED = {"char01": [1, 2, 3], "char02": [4, 5, 6]}
ZIP_A = {"Alpha": {"char01": [10, 11, 12], "char02": [13, 14, 15]}, "Shared": SHARED}
ZIP_B = {"Beta": {"char01": [20, 21, 22], "char02": [23, 24, 25], "char03": [26, 27, 28]}, "Shared": SHARED}


@pytest.fixture
def zip_folder(tmp_path):
    root = tmp_path / "zips"
    root.mkdir()
    _write_zip(root / "part1.zip", "part1", ZIP_A)
    _write_zip(root / "part2.zip", "part2", ZIP_B)
    (root / "README.md").write_text("not a zip, ignored")
    return root


def test_folder_of_zips_pools_groups_and_reads_identical_files_once(zip_folder):
    data = load_dataset(str(zip_folder))
    assert data.class_names == [
        "Alpha/char01",
        "Alpha/char02",
        "Beta/char01",
        "Beta/char02",
        "Beta/char03",
        "Shared/char01",
        "Shared/char02",
    ]
    assert data.groups == ["Alpha", "Alpha", "Beta", "Beta", "Beta", "Shared", "Shared"]
    # 7 identities x 3 images; the 6 Shared files of the second zip are byte-identical and read once.
    assert len(data.images) == 21 and data.duplicates_skipped == 6
    assert np.bincount(data.labels).tolist() == [3] * 7
    first = np.asarray(Image.open(io.BytesIO(_png(1))))
    np.testing.assert_array_equal(data.images[data.class_names.index("Shared/char01") * 3], first)
    assert data.images[0].dtype == np.uint8 and data.images[0].shape == (10, 10)


def test_one_zip_and_the_same_tree_unzipped_give_the_same_set(zip_folder, tmp_path):
    from_zip = load_dataset(str(zip_folder / "part1.zip"))
    assert from_zip.class_names == ["Alpha/char01", "Alpha/char02", "Shared/char01", "Shared/char02"]
    with zipfile.ZipFile(zip_folder / "part1.zip") as zf:
        zf.extractall(tmp_path / "unzipped")
    # With the split folder above the groups (4 deep) and without it (3 deep: <group>/<identity>/<image>).
    for root in (tmp_path / "unzipped", tmp_path / "unzipped" / "part1"):
        tree = load_dataset(str(root))
        assert tree.class_names == from_zip.class_names and tree.groups == from_zip.groups
        assert tree.labels.tolist() == from_zip.labels.tolist()
        for a, b in zip(tree.images, from_zip.images, strict=True):
            np.testing.assert_array_equal(a, b)


def test_same_identity_with_different_files_in_two_zips_keeps_both(tmp_path):
    _write_zip(tmp_path / "a.zip", "s", {"G": {"c1": [1, 2], "c2": [3, 4]}})
    _write_zip(tmp_path / "b.zip", "s", {"G": {"c1": [1, 9]}})  # 01.png differs, 00.png is a duplicate
    data = load_dataset(str(tmp_path))
    assert np.bincount(data.labels).tolist() == [3, 2] and data.duplicates_skipped == 1


def test_flat_identity_zip_has_no_groups(tmp_path):
    with zipfile.ZipFile(tmp_path / "flat.zip", "w") as zf:
        for person in ("ann", "ben"):
            for k in range(2):
                zf.writestr(f"{person}/{k}.png", _png(k + len(person)))
    data = load_dataset(str(tmp_path / "flat.zip"))
    assert data.class_names == ["ann", "ben"] and data.groups is None


def test_broken_member_is_named_with_its_zip(tmp_path):
    path = _write_zip(tmp_path / "bad.zip", "s", {"G": {"c1": [1], "c2": [2]}})
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("s/G/c2/broken.png", b"not a png")
    with pytest.raises(DataError, match=r"bad\.zip:s/G/c2/broken\.png: unreadable image"):
        load_dataset(str(path))


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_bytes(b"PK not really"), "not a readable zip"),
        (lambda p: zipfile.ZipFile(p, "w").close(), "no images"),
    ],
)
def test_unreadable_or_empty_zip_is_named(tmp_path, write, message):
    path = tmp_path / "x.zip"
    write(path)
    with pytest.raises(DataError, match=f"x.zip: {message}"):
        load_grouped_set(path)


def test_images_at_mixed_depths_are_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as zf:
        zf.writestr("G/c1/0.png", _png(1))
        zf.writestr("c2/0.png", _png(2))
    with pytest.raises(DataError, match="images at different depths"):
        load_dataset(str(tmp_path / "mixed.zip"))


def test_folder_with_zips_and_subfolders_is_ambiguous(zip_folder):
    (zip_folder / "person" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match=r"holds both \.zip files and sub-folders"):
        load_dataset(str(zip_folder))


def test_heldout_groups_hold_out_whole_groups(zip_folder):
    data = load_dataset(str(zip_folder))
    config = RunConfig(dataset=str(zip_folder), heldout_groups=["Beta"], val_fraction=0.0)
    idx = split_indices(config, data)
    assert idx.heldout_classes == ["Beta/char01", "Beta/char02", "Beta/char03"]
    train_groups = {c.split("/")[0] for c in idx.train_classes}
    assert train_groups == {"Alpha", "Shared"}
    splits = build_splits(config, data)
    assert splits.heldout_class_names == idx.heldout_classes and len(splits.x_heldout) == 9
    assert len(splits.x_train) == 12 and set(splits.y_train) == set(range(4))


def test_heldout_group_count_is_seeded_and_whole_groups():
    names = [f"{g}/c{i}" for g in "abcdef" for i in range(3)]
    groups = [n.split("/")[0] for n in names]
    held = choose_heldout_groups(names, groups, names=None, count=2, seed=4)
    assert held == choose_heldout_groups(names, groups, names=None, count=2, seed=4)
    held_groups = {n.split("/")[0] for n in held}
    assert len(held_groups) == 2 and len(held) == 6
    draws = {tuple(choose_heldout_groups(names, groups, names=None, count=2, seed=s)) for s in range(8)}
    assert len(draws) > 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": ["Gamma"], "count": None}, "unknown group.*Gamma.*has Alpha, Beta, Shared"),
        ({"names": ["Alpha", "Beta", "Shared"], "count": None}, "leaves none to train on"),
        ({"names": None, "count": 3}, "only 3 groups"),
    ],
)
def test_bad_heldout_groups_are_refused_naming_the_known_ones(zip_folder, kwargs, message):
    data = load_dataset(str(zip_folder))
    with pytest.raises(DataError, match=message):
        choose_heldout_groups(data.class_names, data.groups, seed=0, source="zips", **kwargs)


def test_heldout_groups_need_a_group_level():
    config = RunConfig(heldout_groups=["a"])  # digits: no groups
    with pytest.raises(DataError, match=r"--heldout-groups.*no group level"):
        build_splits(config)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"heldout_groups": ["A"], "heldout_classes": ["7"]}, "--heldout-groups .*--heldout-classes"),
        ({"heldout_groups": ["A"], "heldout_count": 2}, "--heldout-groups .*--heldout-count"),
        ({"heldout_group_count": 1, "heldout_count": 2}, "--heldout-group-count .*--heldout-count"),
        ({"heldout_groups": ["A"], "heldout_group_count": 1}, "--heldout-groups or --heldout-group-count"),
        ({"heldout_groups": ["A", "A"]}, "--heldout-groups: names are repeated"),
        ({"heldout_groups": ["A", ""]}, "--heldout-groups: names must be non-empty"),
        ({"heldout_groups": ["A,B"]}, "--heldout-groups: group names cannot contain"),
        ({"heldout_group_count": 0}, "--heldout-group-count:"),
    ],
)
def test_heldout_group_options_are_validated(options, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_options(**options)


def test_heldout_groups_round_trip_through_a_bundle_recipe(zip_folder):
    config = RunConfig(
        dataset=str(zip_folder), heldout_groups=["Beta", "Alpha"], augment_rotation=10.0, augment_flip=True
    )
    idx = split_indices(config, load_dataset(str(zip_folder)))
    run = SimpleNamespace(
        config=config, class_names=idx.train_classes, heldout_class_names=idx.heldout_classes
    )
    recipe = recipe_of(run)
    assert recipe.options["heldout_groups"] == "Beta,Alpha"
    assert recipe.heldout_classes == idx.heldout_classes
    # Through the manifest's JSON, as check-bundle reads it.
    recipe = type(recipe).model_validate_json(recipe.model_dump_json())
    assert config_from_recipe(recipe) == config


def test_heldout_count_recipe_rebuilds_too():
    config = RunConfig(heldout_count=3)
    idx = split_indices(config, load_dataset("digits"))
    run = SimpleNamespace(
        config=config, class_names=idx.train_classes, heldout_class_names=idx.heldout_classes
    )
    assert config_from_recipe(recipe_of(run)) == config


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason="Omniglot zips not present (../shared/data/omniglot/)")
def test_real_omniglot_zips_pool_to_242_characters_of_8_alphabets():
    data = load_dataset(str(OMNIGLOT))
    assert len(data.class_names) == 242 and len(data.images) == 4840
    assert len(set(data.groups)) == 8 and data.duplicates_skipped == 1000  # Greek + Latin, read once
    assert np.bincount(data.labels).tolist() == [20] * 242  # 20 drawers per character
    assert all(im.shape == (105, 105) and im.dtype == np.uint8 for im in data.images[:50])
    config = RunConfig(dataset=str(OMNIGLOT), heldout_groups=["Korean", "Tagalog"], image_size=28)
    idx = split_indices(config, data)
    held = {c.split("/")[0] for c in idx.heldout_classes}
    trained = {c.split("/")[0] for c in idx.train_classes}
    assert held == {"Korean", "Tagalog"} and not held & trained and len(trained) == 6
    assert len(idx.heldout_classes) == 40 + 17 and len(idx.heldout) == 57 * 20


@pytest.mark.slow
def test_cli_trains_on_zips_with_heldout_groups_and_augmentation_and_resumes_exactly(zip_folder, tmp_path):
    from typer.testing import CliRunner

    from training.cli import app
    from training.run import load_run

    args = ["--dataset", str(zip_folder), "--heldout-groups", "Beta", "--image-size", "8", "--width", "4"]
    args += ["--feature-dim", "4", "--batch-size", "4", "--val-fraction", "0", "--quiet", "--seed", "1"]
    args += ["--augment-rotation", "20", "--augment-shear", "10", "--augment-scale", "0.1"]
    args += ["--augment-translate", "0.1", "--augment-fill", "255"]
    runner = CliRunner()
    straight = runner.invoke(app, ["train", "--out", str(tmp_path / "a"), "--epochs", "2", *args])
    assert straight.exit_code == 0, straight.output
    first = runner.invoke(app, ["train", "--out", str(tmp_path / "b"), "--epochs", "1", *args])
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(app, ["train", "--out", str(tmp_path / "b"), "--resume", "--epochs", "2"])
    assert resumed.exit_code == 0, resumed.output
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    assert a.heldout_class_names == ["Beta/char01", "Beta/char02", "Beta/char03"]
    assert a.config.heldout_groups == ["Beta"] and a.config.augment_fill == "255"
    np.testing.assert_allclose(b.centers, a.centers, atol=1e-6)
    for wa, wb in zip(a.embedding.get_weights(), b.embedding.get_weights(), strict=True):
        np.testing.assert_allclose(wb, wa, atol=1e-6)


def test_cli_refuses_heldout_groups_with_heldout_classes(zip_folder, tmp_path):
    from typer.testing import CliRunner

    from training.cli import app

    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--dataset", str(zip_folder), "--heldout-groups", "Beta"]
    result = CliRunner().invoke(app, [*args, "--heldout-classes", "Alpha/char01"])
    assert (
        result.exit_code == 2 and "--heldout-groups" in result.output and "--heldout-classes" in result.output
    )
    unknown = CliRunner().invoke(
        app, ["train", "--out", str(out), "--dataset", str(zip_folder), "--heldout-groups", "Gamma"]
    )
    assert unknown.exit_code == 2 and "unknown group(s) Gamma" in unknown.output and "Alpha" in unknown.output
    assert not out.exists()


def test_group_and_augment_options_are_validated_by_train_and_by_a_build_bundle_recipe(zip_folder, tmp_path):
    import json

    from typer.testing import CliRunner

    from training.cli import app

    base = ["train", "--dataset", str(zip_folder), "--heldout-groups", "Beta", "--out", str(tmp_path / "out")]
    bad = CliRunner().invoke(app, [*base, "--augment-rotation", "500"])
    assert bad.exit_code == 2 and "--augment-rotation" in bad.output and "No such option" not in bad.output
    both = CliRunner().invoke(app, [*base, "--heldout-group-count", "1"])
    assert both.exit_code == 2 and "--heldout-groups or --heldout-group-count" in both.output
    # build-bundle takes these from its recipe; the same validation names the same options.
    recipe = tmp_path / "r.json"
    train = {"dataset": str(zip_folder), "heldout_groups": ["Beta"], "augment_rotation": 500}
    recipe.write_text(json.dumps({"train": train}))
    out = ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")]
    bundle = ["build-bundle", "--recipe", str(recipe), *out]
    bad = CliRunner().invoke(app, bundle)
    assert bad.exit_code == 2 and "--augment-rotation" in bad.output
    recipe.write_text(json.dumps({"train": {"dataset": str(zip_folder), "heldout_group_count": 1}}))
    both = CliRunner().invoke(app, [*bundle, "--heldout-groups", "Beta"])
    assert both.exit_code == 2 and "--heldout-groups or --heldout-group-count" in both.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()
