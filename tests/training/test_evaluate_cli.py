"""`idembed-train evaluate | export | build-bundle`: bad input stops early, naming the culprit."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorflow")

from typer.testing import CliRunner

from training.cli import app

runner = CliRunner()


def _run(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_evaluate_of_a_folder_that_is_not_a_run_names_the_missing_file(tmp_path):
    code, out = _run("evaluate", str(tmp_path / "nope"))
    assert code == 2
    assert "config.json" in out and "missing" in out


def test_evaluate_rejects_a_bad_protocol_option_before_loading_anything(tmp_path):
    code, out = _run("evaluate", str(tmp_path / "nope"), "--folds", "1")
    assert code == 2
    assert "--folds must be >= 2" in out


def test_export_rejects_bad_pair_counts(tmp_path):
    code, out = _run("export", str(tmp_path / "nope"), "--out", str(tmp_path / "b"), "--max-impostor", "0")
    assert code == 2
    assert "--max-impostor must be >= 1" in out
    assert not (tmp_path / "b").exists()


def test_build_bundle_refuses_lambda_zero_before_training(tmp_path):
    code, out = _run(
        "build-bundle", "--out", str(tmp_path / "b"), "--work", str(tmp_path / "w"), "--lambda", "0"
    )
    assert code == 2
    assert "--lambda must be > 0" in out
    assert not (tmp_path / "w" / "center").exists()


def test_build_bundle_names_an_unknown_heldout_class(tmp_path):
    code, out = _run(
        "build-bundle",
        "--out",
        str(tmp_path / "b"),
        "--work",
        str(tmp_path / "w"),
        "--heldout-classes",
        "7,x",
    )
    assert code == 2
    assert "--heldout-classes: unknown class(es) x" in out
