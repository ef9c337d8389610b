"""RunConfig <-> the manifest's TrainingRecipe, written once: one table read in both directions.

A bundle's recipe says how its model was trained; `config_from_recipe` rebuilds the RunConfig from it (to
re-run the training or re-draw the exact split, as `check-bundle` does). The fields the recipe names itself
are in `RECIPE_FIELDS`; every other scalar RunConfig option travels in `recipe.options` under its own name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from bundle.manifest import TrainingRecipe
from training.config import RunConfig

if TYPE_CHECKING:  # training.run imports TensorFlow; this module stays light
    from training.run import TrainedRun

# RunConfig field -> the TrainingRecipe field that carries it.
RECIPE_FIELDS: dict[str, str] = {
    "backbone": "backbone",
    "head": "head",
    "head_params": "head_params",
    "rule": "center_update",
    "center_lambda": "center_lambda",
    "alpha": "center_alpha",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "seed": "seed",
    "dataset": "dataset",
    "val_fraction": "val_fraction",
}
# The held-out identities: the recipe records the names that were drawn (`recipe.heldout_classes`), the config
# the rule that drew them. A split drawn by one of these options is re-drawn by it, which gives the same
# identities; the names alone would contradict the rule ("not both").
SPLIT_RULES = ("heldout_groups", "heldout_group_count", "heldout_count")
# Options are scalars: a list option travels encoded (RunConfig forbids commas in group names).
_ENCODED: dict[str, tuple[Callable[[Any], str], Callable[[str], Any]]] = {
    "heldout_groups": (",".join, lambda text: text.split(",")),
}
# Not in the recipe: files on the training machine the run only reported on (a re-run need not have them).
NOT_RECORDED = frozenset({"verify_pairs"})
_SCALAR = float | int | str | bool | None


def recipe_from_config(
    config: RunConfig, *, train_classes: Sequence[str], heldout_classes: Sequence[str]
) -> TrainingRecipe:
    """The recipe of a run of `config` that trained on `train_classes` and held out `heldout_classes`."""
    named = {recipe: getattr(config, field) for field, recipe in RECIPE_FIELDS.items()}
    options: dict[str, Any] = {}
    for key, value in config.model_dump().items():
        if key in RECIPE_FIELDS or key in NOT_RECORDED or key == "heldout_classes":
            continue
        if key in _ENCODED and value is not None:
            options[key] = _ENCODED[key][0](value)
        elif isinstance(value, _SCALAR):
            options[key] = value
        else:  # a new RunConfig field that is not a scalar: say how it travels, above
            raise TypeError(f"RunConfig.{key} ({type(value).__name__}) has no place in the manifest recipe")
    return TrainingRecipe(
        **{**named, "head_params": dict(config.head_params)},
        train_classes=list(train_classes),
        heldout_classes=list(heldout_classes),
        options=options,
    )


def recipe_of(run: TrainedRun) -> TrainingRecipe:
    """The recipe of a finished run (what `export` writes into the manifest)."""
    return recipe_from_config(
        run.config, train_classes=run.class_names, heldout_classes=run.heldout_class_names
    )


def config_from_recipe(recipe: TrainingRecipe) -> RunConfig:
    """The RunConfig a bundle was trained with, rebuilt from its manifest (to re-run or re-split it)."""
    known = set(RunConfig.model_fields)
    options = {k: v for k, v in recipe.options.items() if k in known}
    for key, (_, decode) in _ENCODED.items():
        if isinstance(options.get(key), str):
            options[key] = decode(options[key])
    by_rule = any(options.get(k) is not None for k in SPLIT_RULES)
    named = {field: getattr(recipe, name) for field, name in RECIPE_FIELDS.items()}
    return RunConfig.from_options(
        **{
            **options,
            **named,
            "head_params": dict(recipe.head_params),
            "heldout_classes": None if by_rule else recipe.heldout_classes,
        }
    )
