"""`check-bundle`: a bundle's manifest numbers next to the same numbers re-measured from its own ONNX model,
on its recipe's held-out identities (an imported bundle: its folder's), under its recorded protocol."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bundle.files import load_bundle
from training.config import EvaluationSettings
from training.data import build_splits
from training.evaluate import evaluate_embeddings, measure_at
from training.export import onnx_embed
from training.workflows.compare import CENTER
from training.workflows.manifest_recipe import config_from_recipe

# The manifest numbers re-measured (besides every threshold's FAR and TAR).
CHECKED = ("eer", "roc_auc", "kfold_accuracy_mean", "tar_at_far_1e-02")


@dataclass(frozen=True)
class BundleCheck:
    """A bundle's manifest numbers next to the same numbers re-measured from its own ONNX model."""

    rows: list[tuple[str, float, float]]  # (metric, manifest, measured)
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(abs(a - b) <= self.tolerance for _, a, b in self.rows)


def check_bundle(path: Path, *, tolerance: float = 1e-3) -> BundleCheck:
    """Re-score the bundle's held-out identities with its ONNX model (as the service runs it) under the
    protocol recorded in its manifest; the manifest can be trusted when every number agrees within
    `tolerance` (float32 inference may flip pairs that sit exactly on a threshold, nothing more)."""
    bundle = load_bundle(path)
    m = bundle.manifest
    recorded = m.evaluation.get("protocol_settings")
    settings = EvaluationSettings(**recorded) if isinstance(recorded, dict) else EvaluationSettings()
    if m.provenance is not None:  # imported: no training recipe to re-run, its folder split instead
        from training.import_onnx import heldout_inputs

        x_held, y_held, groups = heldout_inputs(m)
        features = onnx_embed(bundle.model_bytes, x_held, m.input.name)
        ev = evaluate_embeddings(CENTER, features, y_held, settings, groups=groups)
    else:
        splits = build_splits(config_from_recipe(m.training))
        features = onnx_embed(bundle.model_bytes, splits.x_heldout, m.input.name)
        ev = evaluate_embeddings(CENTER, features, splits.y_heldout, settings, groups=splits.heldout_groups)
    measured = ev.summary()
    rows = [
        (key, float(m.evaluation[key]), float(measured[key]))
        for key in CHECKED
        if isinstance(m.evaluation.get(key), int | float) and isinstance(measured.get(key), int | float)
    ]
    if ev.calibration_scores is not None and ev.calibration_pairs is not None:
        cal_scores, cal_same = ev.calibration_scores, ev.calibration_pairs.same
    else:  # a bundle calibrated before out-of-sample calibration existed: on all held-out pairs
        cal_scores, cal_same = ev.scores, ev.pairs.same
    for name, point in (
        ("threshold_default", m.thresholds.at_target_far),
        ("threshold_eer", m.thresholds.eer),
    ):
        got = measure_at(cal_scores, cal_same, point.threshold)
        rows += [(f"{name}.far", point.far, got.far), (f"{name}.tar", point.tar, got.tar)]
    oos = m.thresholds.out_of_sample
    if oos is not None and ev.test_scores is not None and ev.test_pairs is not None:
        for name, checked in (("test_default", oos.at_default), ("test_eer", oos.at_eer)):
            got = measure_at(ev.test_scores, ev.test_pairs.same, checked.threshold)
            rows += [(f"{name}.far", checked.far, got.far), (f"{name}.tar", checked.tar, got.tar)]
    return BundleCheck(rows, tolerance)
