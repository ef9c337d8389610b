"""One held-out split serves every embedder: the softmax + center run, its softmax-only twin (same config,
lambda = 0) and PCA on pixels are all scored on the same held-out identities and the same seeded pairs, so
the comparison is like with like."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bundle.manifest import Thresholds
from training.baselines import DEFAULT_PCA_COMPONENTS, PixelPCAEmbedder
from training.config import RunConfig
from training.data import Splits
from training.evaluate import (
    EvaluationSettings,
    OpenSetEvaluation,
    calibrate_out_of_sample,
    evaluate_embeddings,
)
from training.plots import RocCurve
from training.run import RunError, TrainedRun
from training.workflows.runs import embed

# Row names: the default run (softmax head + center loss), its lambda-0 twin, and PCA on pixels.
CENTER = "softmax+center"
SOFTMAX = "softmax"
PCA = "pca-pixels"


def run_label(config: RunConfig) -> str:
    """How reports name a run: its head, and `+center` when the center loss is on (`arcface+center`)."""
    return f"{config.head}+center" if config.center_lambda > 0 else config.head


def shown(names: list[str], limit: int = 12) -> str:
    """Names for a sentence: the first `limit`, then how many in all."""
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


@dataclass(frozen=True)
class Comparison:
    """Open-set results of the trained model and its baselines on one held-out split."""

    dataset: str
    train_classes: list[str]
    heldout_classes: list[str]
    settings: EvaluationSettings
    evaluations: dict[str, OpenSetEvaluation]  # the run first, then the baselines that were run
    # name of the lambda-0 twin among `evaluations` (its head alone, e.g. "softmax" or "arcface"), if run
    twin: str | None = None
    # every network's head and center-loss weight, by name, so a report says exactly what each row is
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # The same protocol on validation images of the TRAINING identities: shows what the loss does where it
    # was trained, next to how much of it carries over to unseen identities.
    seen: dict[str, OpenSetEvaluation] = field(default_factory=dict)

    @property
    def main(self) -> OpenSetEvaluation:
        return next(iter(self.evaluations.values()))

    def protocol(self) -> str:
        """One sentence saying which identities every number is measured on."""
        text = (
            f"pairs on {len(self.heldout_classes)} identities unseen in training "
            f"({shown(self.heldout_classes)}), seed {self.settings.seed}"
        )
        split = self.main.split
        if split.has_calibration:
            text += (
                f"; thresholds chosen on {len(split.calibration_classes)} of them (calibration identities) "
                f"and measured on the other {len(split.test_classes)} (test identities)"
            )
        return text

    def eer_ratio(self) -> float | None:
        """EER of softmax + center divided by EER of softmax-only (goal: <= 0.7)."""
        if self.twin is None or self.twin not in self.evaluations:
            return None
        soft = self.evaluations[self.twin].verification.eer
        return self.main.verification.eer / soft if soft > 0 else None

    def rows(self) -> list[dict[str, Any]]:
        return [{**e.as_dict(), **self.recipes.get(name, {})} for name, e in self.evaluations.items()]

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "train_classes": self.train_classes,
            "heldout_classes": self.heldout_classes,
            "protocol": self.settings.as_dict(),
            "results": self.rows(),
            "seen_identities": [e.as_dict() for e in self.seen.values()],
            "eer_ratio_center_over_softmax": self.eer_ratio(),
            "seconds": self.seconds,
        }

    def manifest_evaluation(self) -> dict[str, Any]:
        """The manifest's `evaluation`: the bundled model's numbers at top level, baselines nested."""
        out: dict[str, Any] = {
            "protocol": self.protocol(),
            # The knobs that reproduce these numbers (`check_bundle` re-measures with them).
            "protocol_settings": {
                k: v for k, v in self.settings.as_dict().items() if isinstance(v, int | float | str)
            },
            **self.main.summary(),
        }
        for name, ev in list(self.evaluations.items())[1:]:
            out[f"baseline_{name}"] = ev.summary()
        ratio = self.eer_ratio()
        if ratio is not None:
            out["eer_ratio_center_over_softmax"] = round(ratio, 4)
        if self.seen:
            out["seen_identities_eer"] = {n: round(e.verification.eer, 6) for n, e in self.seen.items()}
        return out

    def roc_curves(self) -> list[RocCurve]:
        return [
            RocCurve(
                name, e.verification.roc_fpr, e.verification.roc_tpr, e.verification.auc, e.verification.eer
            )
            for name, e in self.evaluations.items()
        ]


def compare(
    run: TrainedRun,
    *,
    softmax: TrainedRun | None,
    settings: EvaluationSettings,
    pca_components: int | None = DEFAULT_PCA_COMPONENTS,
    splits: Splits | None = None,
) -> Comparison:
    """Score the run, its softmax-only twin (if given) and PCA on pixels (if `pca_components`) on the held-out
    identities of the run's own split."""
    splits = splits if splits is not None else run.splits()
    if softmax is not None and run.config.center_lambda == 0:
        raise RunError(f"{run.path} is itself softmax-only (lambda 0); it needs no softmax baseline")
    if softmax is not None and softmax.heldout_class_names != run.heldout_class_names:
        raise RunError(
            f"softmax baseline {softmax.path} held out {softmax.heldout_class_names}, "
            f"the run held out {run.heldout_class_names}: not the same split"
        )
    labels = splits.y_heldout
    evaluations: dict[str, OpenSetEvaluation] = {}
    seconds: dict[str, float] = {}
    embedders: list[tuple[str, Any]] = [(run_label(run.config), run.embedding)]
    recipes = {run_label(run.config): {"head": run.config.head, "lambda": run.config.center_lambda}}
    twin = None
    if softmax is not None:
        twin = run_label(softmax.config)
        embedders.append((twin, softmax.embedding))
        recipes[twin] = {"head": softmax.config.head, "lambda": softmax.config.center_lambda}
    seen: dict[str, OpenSetEvaluation] = {}
    val_ok = len(np.unique(splits.y_val)) >= 2 and np.bincount(splits.y_val).max() >= 2
    for name, model in embedders:
        started = time.perf_counter()
        evaluations[name] = evaluate_embeddings(
            name, embed(model, splits.x_heldout), labels, settings, groups=splits.heldout_groups
        )
        if val_ok:
            seen[name] = evaluate_embeddings(name, embed(model, splits.x_val), splits.y_val, settings)
        seconds[f"evaluate_{name}"] = round(time.perf_counter() - started, 2)
    if pca_components:
        started = time.perf_counter()
        # Fitted on training identities only: the held-out ones stay unseen, as for the networks.
        pca = PixelPCAEmbedder(pca_components, seed=settings.seed).fit(splits.x_train)
        evaluations[PCA] = evaluate_embeddings(
            PCA, pca.embed(splits.x_heldout), labels, settings, groups=splits.heldout_groups
        )
        seconds[f"evaluate_{PCA}"] = round(time.perf_counter() - started, 2)
    return Comparison(
        dataset=run.config.dataset,
        train_classes=run.class_names,
        heldout_classes=run.heldout_class_names,
        settings=settings,
        evaluations=evaluations,
        seconds=seconds,
        seen=seen,
        twin=twin,
        recipes=recipes,
    )


def calibrate(evaluation: OpenSetEvaluation, target_far: float, min_errors: int) -> Thresholds:
    """The manifest thresholds: chosen on held-out calibration identities, measured on the test ones."""
    return calibrate_out_of_sample(evaluation, target_far=target_far, min_errors=min_errors)
