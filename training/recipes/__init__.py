"""Bundle recipes: small JSON files naming a training run, its evaluation protocol and the bundle's name.

`idembed-train build-bundle --recipe NAME` (a file in this folder, or any path) trains the recipe and its
lambda-0 twin, compares them with PCA, calibrates and exports; command-line options override single fields.
A recipe is the whole experiment in one place (insightface's per-experiment configs), not a flag soup.

Keys: `description`; `train` (RunConfig fields); `evaluation` (EvaluationSettings fields); `bundle` (`name`,
`version`, `target_far`, `samples`: how many test identities get sample images).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPES_DIR = Path(__file__).resolve().parent
_KEYS = {"description", "train", "evaluation", "bundle"}
_BUNDLE_KEYS = {"name", "version", "target_far", "samples"}


class RecipeError(ValueError):
    """A recipe that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class Recipe:
    path: Path
    description: str
    train: dict[str, Any]
    evaluation: dict[str, Any] = field(default_factory=dict)
    bundle: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.bundle.get("name", self.path.stem))


def available() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name (`default`, `omniglot`) or a JSON file by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise RecipeError(
            f"--recipe {name_or_path}: no such file; built-in recipes: {', '.join(available())}"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RecipeError(f"{path}: not a readable JSON recipe ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), dict):
        raise RecipeError(f"{path}: a recipe is a JSON object with a 'train' object")
    unknown = sorted(set(raw) - _KEYS) + sorted(
        f"bundle.{k}" for k in set(raw.get("bundle", {})) - _BUNDLE_KEYS
    )
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {', '.join(unknown)}")
    return Recipe(
        path=path,
        description=str(raw.get("description", "")),
        train=dict(raw["train"]),
        evaluation=dict(raw.get("evaluation", {})),
        bundle=dict(raw.get("bundle", {})),
    )
