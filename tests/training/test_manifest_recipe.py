"""RunConfig <-> the manifest's TrainingRecipe (training/workflows/manifest_recipe.py): one table, read both
ways, so a bundle's recipe rebuilds the config it was trained with."""

from __future__ import annotations

import pytest

from bundle.manifest import TrainingRecipe
from training.config import RunConfig
from training.workflows.manifest_recipe import (
    NOT_RECORDED,
    RECIPE_FIELDS,
    config_from_recipe,
    recipe_from_config,
)

CLASSES = [f"c{k}" for k in range(10)]


def _round_trip(config: RunConfig, heldout: list[str]) -> tuple[TrainingRecipe, RunConfig]:
    train = [c for c in CLASSES if c not in heldout]
    recipe = recipe_from_config(config, train_classes=train, heldout_classes=heldout)
    # Through JSON, as a manifest stores it.
    recipe = TrainingRecipe.model_validate_json(recipe.model_dump_json())
    return recipe, config_from_recipe(recipe)


@pytest.mark.parametrize(
    "options",
    [
        {"heldout_classes": ["c7", "c8", "c9"]},
        {
            "heldout_classes": ["c1", "c2"],
            "backbone": "conv4",
            "head": "arcface",
            "head_params": {"margin": 0.3, "scale": 16.0},
            "rule": "facenet",
            "center_lambda": 0.05,
            "epochs": 3,
            "batch_size": 32,
            "seed": 7,
            "val_fraction": 0.2,
            "augment_rotation": 10.0,
            "augment_fill": "0",
            "optimizer": "sgd",
            "lr": 0.05,
            "feature_dim": 16,
            "image_size": 12,
        },
        {"heldout_groups": ["Korean", "Tagalog"]},
        {"heldout_group_count": 2},
        {"heldout_count": 3},
    ],
)
def test_config_recipe_config_is_the_same_config(options: dict[str, object]) -> None:
    config = RunConfig.from_options(**options)
    heldout = list(config.heldout_classes or ["c3", "c5"])  # drawn by a rule: any names stand for the draw
    recipe, back = _round_trip(config, heldout)
    assert back == config
    # And the recipe of the rebuilt config is the recipe again.
    again = recipe_from_config(back, train_classes=recipe.train_classes, heldout_classes=heldout)
    assert again == recipe


def test_a_split_drawn_by_fraction_comes_back_as_the_drawn_names() -> None:
    config = RunConfig.from_options(heldout_fraction=0.3)
    recipe, back = _round_trip(config, ["c0", "c4", "c6"])
    assert back == config.model_copy(update={"heldout_classes": ["c0", "c4", "c6"]})
    assert recipe.options["heldout_fraction"] == 0.3


def test_every_run_config_field_has_its_place() -> None:
    config = RunConfig.from_options(heldout_groups=["a", "b"])
    recipe = recipe_from_config(config, train_classes=CLASSES[:8], heldout_classes=CLASSES[8:])
    named = set(RECIPE_FIELDS) | {"heldout_classes"} | NOT_RECORDED
    for field in RunConfig.model_fields:
        assert (field in named) != (field in recipe.options), field
    assert recipe.options["heldout_groups"] == "a,b"  # options are scalars
    assert set(RECIPE_FIELDS.values()) <= set(TrainingRecipe.model_fields)
