"""`idembed-serve`: sample images for the curl examples, and clear refusals before any server starts."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


def test_samples_writes_digit_pngs(tmp_path: Path) -> None:
    result = runner.invoke(app, ["samples", "--out", str(tmp_path), "--per-class", "2"])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(files) == 20 and files[0] == "0_0.png" and files[-1] == "9_1.png"
    with Image.open(tmp_path / "3_1.png") as img:
        assert img.size == (8, 8) and img.mode == "L"


def test_serve_refuses_a_folder_without_a_bundle(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--bundle", str(tmp_path)])
    assert result.exit_code == 2 and "manifest.json missing" in result.output


def test_serve_names_an_invalid_setting(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--bundle", str(tmp_path), "--port", "70000"])
    assert result.exit_code == 2 and "IDEMBED_PORT" in result.output
