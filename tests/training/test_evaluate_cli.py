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


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lambda", "0"], "--lambda must be > 0"),
        # It reached numpy's calibration as a bare ValueError, after both runs had trained.
        (["--target-far", "2"], "error: --target-far must be in (0, 1), got 2"),
    ],
)
def test_build_bundle_refuses_a_bad_option_before_training(tmp_path, args, needle):
    code, out = _run("build-bundle", "--out", str(tmp_path / "b"), "--work", str(tmp_path / "w"), *args)
    assert code == 2
    assert needle in out
    assert not (tmp_path / "w" / "center").exists()


def test_build_bundle_names_an_unknown_heldout_class(tmp_path):
    code, out = _run(
        "build-bundle",
        "--out",
        str(tmp_path / "b"),
        "--work",
        str(tmp_path / "w"),
        "--heldout-classes",
        "07,x",
    )
    assert code == 2
    assert "--heldout-classes: unknown class(es) x" in out


def test_build_bundle_names_an_unknown_or_broken_recipe(tmp_path):
    code, out = _run("build-bundle", "--recipe", "nope", "--out", str(tmp_path / "b"))
    assert code == 2 and "--recipe nope: no such file" in out and "default" in out and "omniglot" in out
    bad = tmp_path / "r.json"
    bad.write_text('{"train": {"dataset": "digits"}, "evaluation": {"foldz": 3}}')
    code, out = _run("build-bundle", "--recipe", str(bad), "--out", str(tmp_path / "b"))
    assert code == 2 and "unknown evaluation setting(s) foldz" in out
    bad.write_text('{"train": {"dataset": "digits", "widht": 3}}')
    code, out = _run("build-bundle", "--recipe", str(bad), "--out", str(tmp_path / "b"))
    assert code == 2 and "--widht" in out
    assert not (tmp_path / "b").exists()


def test_built_in_recipes_are_valid_run_configs():
    from training.config import RunConfig
    from training.evaluate import EvaluationSettings
    from training.recipes import available, load_recipe

    assert {"default", "omniglot"} <= set(available())
    for name in available():
        recipe = load_recipe(name)
        config = RunConfig.model_validate(recipe.train)
        assert config.center_lambda > 0, name
        EvaluationSettings(**recipe.evaluation)


@pytest.mark.slow
def test_evaluate_says_when_it_trains_the_twin_and_how_long_it_took(tmp_path):
    run = tmp_path / "run"
    tiny = ["--width", "2", "--feature-dim", "2", "--epochs", "1", "--heldout-classes", "6,7,8,9", "--quiet"]
    code, out = _run("train", "--out", str(run), "--lambda", "0.1", *tiny)
    assert code == 0, out
    fast = ["--max-genuine", "500", "--max-impostor", "2000", "--trials", "1", "--episodes", "0"]
    code, out = _run("evaluate", str(run), "--pca-components", "0", *fast)
    assert code == 0, out
    assert f"training the lambda-0 twin of {run}" in out and "about as long as the run took" in out
    assert "twin trained in" in out and (tmp_path / "run-softmax" / "embedding.keras").is_file()
    code, out = _run("evaluate", str(run), "--pca-components", "0", *fast)
    assert code == 0 and "reusing the finished lambda-0 twin" in out and "training the" not in out
