"""A trained run -> a bundle: thresholds calibrated on the comparison's held-out pairs, the ONNX model
parity-checked on real held-out images, optionally an int8 graph gated on its held-out EER."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from bundle.manifest import BundleManifest
from training import quantize as q
from training.config import (
    CALIBRATION_IMAGES,
    PARITY_TOLERANCE,
    QUANTIZE_METHODS,
    ConfigError,
    check_target_far,
)
from training.data import Splits
from training.evaluate import DEFAULT_TARGET_FAR, evaluate_embeddings
from training.export import export_bundle
from training.run import TrainedRun
from training.workflows.compare import Comparison, calibrate
from training.workflows.manifest_recipe import recipe_of

# The parity check runs on this many real held-out images (the whole held-out set when smaller).
PARITY_BATCH = 256


def export_run(
    run: TrainedRun,
    out: Path,
    comparison: Comparison,
    *,
    target_far: float = DEFAULT_TARGET_FAR,
    name: str = "idembed",
    version: str = "1",
    tolerance: float = PARITY_TOLERANCE,
    splits: Splits | None = None,
    quantize: str | None = None,
    quantize_method: str = "static",
    embed_preprocessing: bool = False,
) -> BundleManifest:
    """Calibrate on the comparison's held-out pairs and write the run as a bundle (parity-checked).

    `quantize="int8"`: the bundle holds an int8 graph, written only if its held-out EER is within
    `training.quantize.MAX_EER_INCREASE` of fp32; its thresholds and evaluation are the int8 model's."""
    check_target_far(target_far)
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize must be int8 (or omitted), got {quantize!r}")
    if quantize_method not in QUANTIZE_METHODS:
        raise ConfigError(
            f"--quantize-method must be {' or '.join(QUANTIZE_METHODS)}, got {quantize_method!r}"
        )
    splits = splits if splits is not None else run.splits()
    thresholds = calibrate(comparison.main, target_far, comparison.settings.min_errors)
    hook = None
    if quantize == "int8":
        hook = _int8_hook(run, comparison, splits, target_far=target_far, method=quantize_method)
    rng = np.random.default_rng(comparison.settings.seed)
    pick = rng.choice(len(splits.x_heldout), min(PARITY_BATCH, len(splits.x_heldout)), replace=False)
    return export_bundle(
        out,
        model=run.embedding,
        centers=run.centers,
        labels=run.class_names,
        parity_batch=splits.x_heldout[np.sort(pick)],
        input_spec=run.input_spec,
        preprocessing=run.preprocessing,
        thresholds=thresholds,
        recipe=recipe_of(run),
        evaluation=comparison.manifest_evaluation(),
        name=name,
        version=version,
        tolerance=tolerance,
        quantize=hook,
        embed_preprocessing=embed_preprocessing,  # the ONNX model normalises uint8 pixels itself
    )


def _int8_hook(run: TrainedRun, comparison: Comparison, splits: Splits, *, target_far: float, method: str):
    """fp32 ONNX bytes -> the int8 graph with its own evaluation and thresholds (or a refusal)."""
    settings = comparison.settings
    labels = splits.y_heldout
    gate_settings = replace(settings, calibration_repeats=1, episodes=0)

    def hook(fp32: bytes) -> q.Quantized:
        rng = np.random.default_rng(settings.seed)
        pick = rng.choice(len(splits.x_train), min(CALIBRATION_IMAGES, len(splits.x_train)), replace=False)
        gate = q.quantize_gated(
            fp32,
            heldout=splits.x_heldout,
            fp32_eer=comparison.main.verification.eer,
            eer_of=lambda emb: evaluate_embeddings("int8", emb, labels, gate_settings).verification.eer,
            input_name=run.input_spec.name,
            method=method,
            calibration=splits.x_train[np.sort(pick)],
            max_eer_increase=q.MAX_EER_INCREASE,
            min_mean_cosine=q.MIN_INT8_MEAN_COSINE,
        )
        main = next(iter(comparison.evaluations))
        ev8 = evaluate_embeddings(main, gate.int8_embeddings, labels, settings, groups=splits.heldout_groups)
        as_int8 = replace(comparison, evaluations={**comparison.evaluations, main: ev8}, seen={})
        evaluation = as_int8.manifest_evaluation()
        evaluation["quantized_from_fp32_eer"] = round(gate.fp32_eer, 6)
        return q.Quantized(
            gate.int8_bytes, calibrate(ev8, target_far, settings.min_errors), evaluation, gate.record
        )

    return hook
