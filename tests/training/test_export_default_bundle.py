"""The committed models/default bundle: small, loadable, and every number in its manifest re-measurable.

The fast tests re-score the held-out digits with the committed ONNX model (no training), so a manifest that
drifted from its model fails here. The heavy test re-runs the documented build command and compares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from bundle import load_bundle
from training.data import build_splits
from training.evaluate import EvaluationSettings, evaluate_embeddings, measure_at
from training.export import onnx_embed
from training.pipeline import CENTER, PCA, SOFTMAX, build_bundle, config_from_recipe

DEFAULT = Path(__file__).resolve().parents[2] / "models" / "default"


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(DEFAULT)


@pytest.fixture(scope="module")
def rescored(bundle):
    """The bundle's own model on its recipe's held-out identities, under the default protocol."""
    config = config_from_recipe(bundle.manifest.training)
    splits = build_splits(config)
    features = onnx_embed(bundle.model_bytes, splits.x_heldout, bundle.manifest.input.name)
    return evaluate_embeddings(CENTER, features, splits.y_heldout, EvaluationSettings())


def test_default_bundle_is_small_and_trained_on_digits_with_7_8_9_held_out(bundle):
    total = sum(f.stat().st_size for f in DEFAULT.iterdir())
    assert total < 1_000_000
    recipe = bundle.manifest.training
    assert recipe.dataset == "digits"
    assert recipe.heldout_classes == ["7", "8", "9"]
    assert recipe.center_lambda > 0
    assert bundle.labels == recipe.train_classes
    ev = bundle.manifest.evaluation
    assert f"baseline_{SOFTMAX}" in ev and f"baseline_{PCA}" in ev


@pytest.mark.slow
def test_manifest_metrics_are_reproduced_by_the_committed_onnx_model(bundle, rescored):
    ev = bundle.manifest.evaluation
    v = rescored.verification
    assert (v.num_genuine, v.num_impostor) == (ev["num_genuine_pairs"], ev["num_impostor_pairs"])
    # float32 onnxruntime here vs float32 Keras at export: equal up to a few flipped near-tied pairs.
    assert v.eer == pytest.approx(ev["eer"], abs=1e-3)
    assert v.auc == pytest.approx(ev["roc_auc"], abs=1e-3)


@pytest.mark.slow
def test_manifest_thresholds_give_the_recorded_rates_on_unseen_identities(bundle, rescored):
    th = bundle.manifest.thresholds
    for point in (th.at_target_far, th.eer):
        measured = measure_at(rescored.scores, rescored.pairs.same, point.threshold)
        assert measured.far == pytest.approx(point.far, abs=1e-3)
        assert measured.tar == pytest.approx(point.tar, abs=1e-3)
    assert th.default == th.at_target_far.threshold
    assert th.at_target_far.far <= th.target_far


@pytest.mark.heavy
def test_rebuilding_with_the_documented_command_reproduces_the_evaluation(bundle, tmp_path, request):
    # heavy tests are opt-in (`-m heavy`): this one trains two models for about a minute.
    if "heavy" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("heavy: run with `python -m pytest -m heavy tests/training`")
    config = config_from_recipe(bundle.manifest.training)
    result = build_bundle(
        config, tmp_path / "bundle", work_dir=tmp_path / "work", settings=EvaluationSettings(), verbose=0
    )
    old, new = bundle.manifest.evaluation, result.manifest.evaluation
    for key in ("eer", "roc_auc", "kfold_accuracy_mean"):
        assert new[key] == pytest.approx(old[key], abs=0.01), key
    for name in (SOFTMAX, PCA):
        assert new[f"baseline_{name}"]["eer"] == pytest.approx(old[f"baseline_{name}"]["eer"], abs=0.01)
    assert np.isclose(result.manifest.thresholds.default, bundle.manifest.thresholds.default, atol=0.01)
