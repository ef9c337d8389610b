"""`idembed-train train`: documented options, invalid values refused before training, a run and its resume."""

import csv

import pytest
from typer.testing import CliRunner

from training.cli import app

runner = CliRunner()
TINY = ["--width", "4", "--feature-dim", "4", "--heldout-classes", "7,8,9", "--batch-size", "128", "--quiet"]


def test_help_explains_every_option_with_its_default():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0
    for option, default in [
        ("--dataset", "digits"),
        ("--lambda", "0.01"),
        ("--alpha", "0.5"),
        ("--rule", "paper"),
        ("--backbone", "lenetpp"),
        ("--batch-size", "64"),
        ("--lr", "0.001"),
        ("--seed", "0"),
        ("--feature-dim", "32"),
        ("--val-fraction", "0.15"),
        ("--epochs", "20"),
    ]:
        assert option in result.output
        assert f"default: {default}" in result.output
    for option in ("--heldout-classes", "--out", "--resume", "--center-lr", "--head", "--margin", "--scale"):
        assert option in result.output


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--lambda", "-1"], "--lambda"),
        (["--alpha", "1.5"], "--alpha"),
        (["--alpha", "0"], "--alpha"),
        (["--backbone", "resnet50"], "--backbone"),
        (["--rule", "average"], "--rule"),
        (["--dataset", "/nonexistent/faces"], "--dataset"),
        (["--heldout-classes", "7,x"], "--heldout-classes"),
    ],
)
def test_invalid_option_fails_before_training_naming_it(args, named, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(out), *args])
    assert result.exit_code == 2
    assert named in result.output
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_train_then_resume_extends_the_run(tmp_path):
    out = tmp_path / "run"
    first = runner.invoke(app, ["train", "--out", str(out), "--epochs", "1", *TINY])
    assert first.exit_code == 0, first.output
    assert "run folder:" in first.output and "val_accuracy" in first.output
    for name in (
        "config.json",
        "classes.json",
        "history.csv",
        "embedding.keras",
        "centers.npy",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "epoch-001.weights.h5").is_file()

    again = runner.invoke(app, ["train", "--out", str(out), "--epochs", "1", *TINY])
    assert again.exit_code == 2 and "--resume" in again.output

    resumed = runner.invoke(app, ["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    with (out / "history.csv").open() as fh:
        assert [row["epoch"] for row in csv.DictReader(fh)] == ["0", "1"]
    assert (out / "checkpoints" / "epoch-002.weights.h5").is_file()


def test_class_count_dependent_head_error_leaves_no_run_folder(tmp_path):
    # CosFace's margin limit K/(K-1) is only known once the data is read; the refusal must still leave
    # nothing behind, so the corrected command can reuse the same --out.
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--epochs", "1", *TINY, "--head", "amsoftmax", "--margin", "1.5"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert "--head" in refused.output and "K/(K-1)" in refused.output
    assert not out.exists()
