"""`idembed-serve`: sample images for the curl examples, and clear refusals before any server starts."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


DEFAULT = Path(__file__).resolve().parents[2] / "models" / "default"


def test_samples_copies_the_default_bundles_images_of_identities_it_never_saw(tmp_path: Path) -> None:
    # No scikit-learn needed: the images ship with the bundle (test identities of its split).
    result = runner.invoke(app, ["samples", "--out", str(tmp_path), "--bundle", str(DEFAULT)])
    assert result.exit_code == 0, result.output
    index = json.loads((DEFAULT / "samples" / "samples.json").read_text())
    manifest = json.loads((DEFAULT / "manifest.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == sorted(f for names in index["identities"].values() for f in names) and len(files) >= 6
    for identity in index["identities"]:
        assert identity in manifest["training"]["heldout_classes"]
        assert identity not in manifest["training"]["train_classes"]
    with Image.open(tmp_path / files[0]) as img:
        assert img.mode == "L" and img.size == (16, 8)


def test_samples_of_a_bundle_without_samples_is_refused_naming_the_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["samples", "--out", str(tmp_path / "s"), "--bundle", str(tmp_path)])
    assert result.exit_code == 2 and "no samples.json" in result.output and str(tmp_path) in result.output
    assert not (tmp_path / "s").exists()


def test_serve_refuses_a_folder_without_a_bundle(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--bundle", str(tmp_path)])
    assert result.exit_code == 2 and "manifest.json missing" in result.output


def test_serve_names_an_invalid_setting(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--bundle", str(tmp_path), "--port", "70000"])
    assert result.exit_code == 2 and "IDEMBED_PORT" in result.output
