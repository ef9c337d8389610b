"""`idembed-train`'s options take their defaults and help from the config models (training/config.py), and
the CLI reports the user's errors as `error: ...` (exit 2) but lets a bug surface with its traceback."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer.main
from typer.core import TyperOption
from typer.testing import CliRunner

from training.cli import EVALUATION_OPTIONS, app
from training.config import (
    DEFAULT_QUANTIZE_METHOD,
    DEFAULT_TARGET_FAR,
    EVALUATION_CLI,
    PARITY_TOLERANCE,
    EvaluationSettings,
    ImportOptions,
    RunConfig,
)

runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands


def _defaults(command: str) -> dict[str, object]:
    return {p.name: p.default for p in COMMANDS[command].params if isinstance(p, TyperOption)}


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_protocol_options_are_evaluation_settings_fields_with_their_defaults(command: str) -> None:
    defaults = _defaults(command)
    help_text = {p.name: p.help for p in COMMANDS[command].params if isinstance(p, TyperOption)}
    assert len(EVALUATION_OPTIONS) == 11
    for f, cli, text in EVALUATION_OPTIONS:
        assert defaults[cli] == f.default, f.name
        assert help_text[cli] == text == EVALUATION_CLI[f.name][1]
    # The names users know: --trials, --eval-seed, --ways, --shots, --within-group.
    assert {cli for _, cli, _ in EVALUATION_OPTIONS} >= {
        "trials",
        "eval_seed",
        "ways",
        "shots",
        "within_group",
    }
    assert (defaults["max_genuine"], defaults["episodes"]) == (
        EvaluationSettings().max_genuine,
        EvaluationSettings().episodes,
    )


def test_export_and_import_defaults_are_the_config_constants() -> None:
    export = _defaults("export")
    assert export["target_far"] == DEFAULT_TARGET_FAR and export["tolerance"] == PARITY_TOLERANCE
    assert export["quantize_method"] == DEFAULT_QUANTIZE_METHOD
    imported = _defaults("import")
    for f in dataclasses.fields(ImportOptions):
        if f.name in imported and imported[f.name] is not None and f.default is not dataclasses.MISSING:
            expected = f.default
            if f.name in ("mean", "std"):  # typed as text on the command line
                expected = ",".join(f"{v:g}" for v in f.default)
            if f.name == "pca_components":  # 0 on the command line is None (no PCA baseline)
                expected = f.default or 0
            assert imported[f.name] == expected, f.name


def test_train_defaults_are_run_config_defaults() -> None:
    defaults = _defaults("train")
    checked = 0
    for name, field in RunConfig.model_fields.items():
        if name not in defaults:
            continue
        cli = defaults[name]
        model = field.get_default(call_default_factory=True)
        # None on the command line: the model decides (a rule's own alpha, the dataset's image size, ...).
        if cli is None:
            continue
        assert cli == model, name
        checked += 1
    assert checked >= 25


def test_a_user_error_exits_2_and_a_bug_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorflow")
    import training.run

    result = runner.invoke(app, ["evaluate", str(tmp_path / "no-run"), "--no-softmax"])
    assert result.exit_code == 2 and "error:" in result.output and "config.json: missing" in result.output

    def bug(path: object) -> None:
        raise ValueError("operands could not be broadcast together")  # as numpy would, deep inside

    monkeypatch.setattr(training.run, "load_run", bug)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "no-run"), "--no-softmax"])
    assert result.exit_code == 1 and "error:" not in result.output
    assert isinstance(result.exception, ValueError) and "broadcast" in str(result.exception)
