"""RunConfig validation: bad options are refused before training, naming the option as typed on the CLI."""

import pytest

from training.config import ConfigError, RunConfig


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"center_lambda": -0.1}, "--lambda:"),
        ({"alpha": 0.0}, "--alpha:"),
        ({"alpha": 1.5}, "--alpha:"),
        ({"backbone": "resnet"}, "--backbone:"),
        ({"rule": "mean"}, "--rule:"),
        ({"head": "nohead"}, "--head: unknown head 'nohead'"),
        ({"dataset": "/no/such/folder"}, "--dataset:"),
        ({"epochs": 0}, "--epochs:"),
        ({"val_fraction": 1.0}, "--val-fraction:"),
        ({"heldout_classes": ["7", ""]}, "--heldout-classes:"),
        ({"rule": "none", "center_lambda": 0.1}, "--rule none"),
        ({"heldout_classes": ["7"], "heldout_count": 2}, "not both"),
    ],
)
def test_invalid_option_is_rejected_naming_it(options, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_options(**options)


def test_alpha_one_and_lambda_zero_are_valid():
    config = RunConfig.from_options(alpha=1.0, center_lambda=0.0, rule="none")
    assert config.alpha == 1.0 and config.center_lambda == 0.0


def test_config_round_trips_through_json(tmp_path):
    config = RunConfig(heldout_classes=["7", "8", "9"], epochs=3, center_lambda=0.05)
    (tmp_path / "config.json").write_text(config.model_dump_json())
    assert RunConfig.load(tmp_path / "config.json") == config


def test_loading_a_missing_config_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: missing"):
        RunConfig.load(tmp_path / "config.json")


def test_center_rule_names_are_defined_once_in_the_manifest_contract() -> None:
    from typing import get_args

    from bundle.manifest import CenterUpdateRule, TrainingRecipe
    from training.center_rules import DEFAULT_ALPHA, RULE_HELP, UPDATE_RULES

    assert UPDATE_RULES == get_args(CenterUpdateRule) == ("paper", "facenet", "gradient", "none")
    assert tuple(RULE_HELP) == tuple(DEFAULT_ALPHA) == UPDATE_RULES
    assert get_args(RunConfig.model_fields["rule"].annotation) == UPDATE_RULES
    assert get_args(TrainingRecipe.model_fields["center_update"].annotation) == UPDATE_RULES


def test_backbone_precision_and_partial_fc_names_match_the_modules_that_build_them() -> None:
    pytest.importorskip("tensorflow")
    from training import config
    from training.backbones import BACKBONES
    from training.face_backbones import FACE_BACKBONES
    from training.heads.partial_fc import PARTIAL_FC_HEADS
    from training.precision import PRECISIONS

    assert set(config.BACKBONES) == set(BACKBONES)
    assert set(config.FACE_BACKBONES) == set(FACE_BACKBONES)
    assert config.PARTIAL_FC_HEADS == PARTIAL_FC_HEADS and config.PRECISIONS == PRECISIONS
