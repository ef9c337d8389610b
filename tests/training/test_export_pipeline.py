"""The one-command builder on bundled digits (tiny model, 2 epochs): runs, compares, calibrates, exports."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from bundle import load_bundle
from training.config import RunConfig
from training.evaluate import EvaluationSettings, measure_at
from training.export import onnx_embed
from training.run import RunError, load_run
from training.workflows.build_bundle import build_bundle
from training.workflows.compare import PCA, SOFTMAX
from training.workflows.report import markdown_table
from training.workflows.runs import embed, ensure_run

CONFIG = RunConfig(
    dataset="digits",
    # Four unseen digits: two choose the thresholds, the other two measure them.
    heldout_classes=["6", "7", "8", "9"],
    feature_dim=4,
    width=2,
    epochs=2,
    center_lambda=0.1,
    seed=0,
)
SETTINGS = EvaluationSettings(max_genuine=2_000, max_impostor=5_000, ident_trials=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    result = build_bundle(CONFIG, root / "bundle", work_dir=root / "work", settings=SETTINGS, verbose=0)
    return root, result


@pytest.mark.slow
def test_build_writes_a_bundle_the_loader_accepts_with_baselines_and_thresholds(built):
    root, result = built
    bundle = load_bundle(root / "bundle")
    m = bundle.manifest
    assert bundle.labels == [str(d) for d in range(6)]
    assert m.training.heldout_classes == ["6", "7", "8", "9"]
    assert m.training.options["width"] == 2 and m.training.options["feature_dim"] == 4
    assert m.embedding.dim == 4
    assert f"baseline_{SOFTMAX}" in m.evaluation and f"baseline_{PCA}" in m.evaluation
    assert m.evaluation["num_impostor_pairs"] == 5_000
    # 5000 calibration impostors resolve FAR 1e-3; the manifest's threshold is the calibrated one.
    th = m.thresholds
    assert th.target_far == pytest.approx(1e-3)
    assert th.at_target_far.far <= 1e-3
    assert th.calibration_identities == 2
    # ... and what it gives on the two test digits, which took no part in choosing it, with its interval.
    oos = th.out_of_sample
    assert oos is not None and oos.num_identities == 2 and oos.num_impostor_pairs == 5_000
    assert oos.at_default.threshold == th.default
    assert oos.at_default.far_interval.low <= oos.at_default.far <= oos.at_default.far_interval.high
    test_digits = set(result.comparison.main.split.test_classes.tolist())
    cal_digits = set(result.comparison.main.split.calibration_classes.tolist())
    assert len(test_digits) == len(cal_digits) == 2 and not test_digits & cal_digits
    assert m.evaluation["export_parity_max_abs_diff"] <= 1e-4
    report = json.loads(result.report_path.read_text())
    assert [r["name"] for r in report["results"]] == ["softmax+center", SOFTMAX, PCA]
    assert result.roc_path.stat().st_size > 0
    assert "| softmax+center (λ=0.1) |" in markdown_table(result.comparison)


@pytest.mark.slow
def test_bundled_thresholds_are_reproduced_from_the_exported_onnx_model(built):
    """The service can trust the manifest: the ONNX model re-scores the held-out pairs to the same rates."""
    root, result = built
    bundle = load_bundle(root / "bundle")
    run = load_run(root / "work" / "center")
    splits = run.splits()
    onnx_features = onnx_embed(bundle.model_bytes, splits.x_heldout)
    np.testing.assert_allclose(onnx_features, embed(run.embedding, splits.x_heldout), atol=1e-4)
    ev = result.comparison.main
    e = onnx_features / np.linalg.norm(onnx_features, axis=1, keepdims=True)
    th = bundle.manifest.thresholds
    # float32 ONNX vs the evaluation's float64 cosine: a pair on the threshold may flip, no more.
    for pairs, point in (
        (ev.calibration_pairs, th.at_target_far),
        (ev.test_pairs, th.out_of_sample.at_default),
    ):
        scores = np.einsum("ij,ij->i", e[pairs.idx_a], e[pairs.idx_b])
        got = measure_at(scores, pairs.same, th.default)
        assert got.far == pytest.approx(point.far, abs=2 / pairs.num_impostor)
        assert got.tar == pytest.approx(point.tar, abs=2 / pairs.num_genuine)


@pytest.mark.slow
def test_rebuild_reuses_finished_runs_and_refuses_lambda_zero(built, tmp_path):
    root, _ = built
    mtime = (root / "work" / "center" / "embedding.keras").stat().st_mtime
    build_bundle(CONFIG, tmp_path / "again", work_dir=root / "work", settings=SETTINGS, verbose=0)
    assert (root / "work" / "center" / "embedding.keras").stat().st_mtime == mtime
    with pytest.raises(ValueError, match="--lambda must be > 0"):
        build_bundle(
            CONFIG.model_copy(update={"center_lambda": 0.0}),
            tmp_path / "x",
            work_dir=tmp_path / "w",
            settings=SETTINGS,
        )


def test_a_work_folder_holding_other_options_is_refused_not_overwritten(tmp_path):
    other = CONFIG.model_copy(update={"epochs": 3, "width": 4})
    (tmp_path / "center").mkdir()
    (tmp_path / "center" / "config.json").write_text(other.model_dump_json())
    with pytest.raises(RunError, match=r"other options \(width, epochs\)"):
        ensure_run(CONFIG, tmp_path / "center")


@pytest.mark.slow
def test_exporting_a_run_twice_in_fresh_processes_writes_a_byte_identical_model(built, tmp_path):
    # "Rebuilding reproduces the bundle" includes model.onnx itself, not only the numbers: no generated name
    # or timestamp in the graph may differ between two processes (git stays clean after a rebuild).
    import hashlib
    import subprocess
    import sys

    root, _ = built
    digests = []
    for k in (1, 2):
        out = tmp_path / f"b{k}"
        cmd = [
            sys.executable,
            "-m",
            "training.cli",
            "export",
            str(root / "work" / "center"),
            "--out",
            str(out),
        ]
        cmd += ["--episodes", "0", "--max-genuine", "2000", "--max-impostor", "5000", "--trials", "2"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        digests.append(hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
