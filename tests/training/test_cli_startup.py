"""`idembed-train` rough edges: `--help` imports no TensorFlow; build-bundle says when it reuses runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli import app

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, runpy, sys
sys.argv = ["idembed-train", *sys.argv[1:]]
try:
    runpy.run_module("training.cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules, "code": code}))
"""


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["build-bundle", "--help"]])
def test_help_imports_no_tensorflow_and_prints_no_tensorflow_logs(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"tensorflow": False, "keras": False, "code": 0}, done.stderr
    assert "Usage" in done.stdout
    assert done.stderr == ""


def test_commands_that_load_tensorflow_print_none_of_its_start_up_lines(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    done = subprocess.run(
        [sys.executable, "-m", "training.cli", "train", "--lambda", "-1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --lambda: Input should be greater than or equal to 0"


@pytest.mark.slow
def test_build_bundle_says_it_reuses_finished_runs_and_retrain_trains_again(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.json"
    recipe.write_text(
        json.dumps(
            {
                "train": {
                    "dataset": "digits",
                    "heldout_classes": ["6", "7", "8", "9"],
                    "width": 2,
                    "feature_dim": 4,
                    "center_lambda": 0.1,
                    "epochs": 1,
                },
                "evaluation": {"max_genuine": 500, "max_impostor": 2000, "ident_trials": 2, "folds": 2},
            }
        )
    )
    quick = [
        "build-bundle",
        "--recipe",
        str(recipe),
        "--work",
        str(tmp_path / "work"),
        "--pca-components",
        "0",
    ]
    runner = CliRunner()
    first = runner.invoke(app, [*quick, "--out", str(tmp_path / "b1")])
    assert first.exit_code == 0, first.output
    assert "reused" not in first.output
    history = tmp_path / "work" / "center" / "history.csv"
    trained_at = history.stat().st_mtime_ns

    again = runner.invoke(app, [*quick, "--out", str(tmp_path / "b2")])
    assert again.exit_code == 0, again.output
    assert "reusing 2 finished run(s)" in again.output and "--retrain" in again.output
    assert "not retrained" in again.output
    assert history.stat().st_mtime_ns == trained_at

    retrained = runner.invoke(app, [*quick, "--out", str(tmp_path / "b3"), "--retrain"])
    assert retrained.exit_code == 0, retrained.output
    assert "reusing" not in retrained.output and "not retrained" not in retrained.output
    assert history.stat().st_mtime_ns != trained_at
