"""`idembed-train export --quantize int8` on a tiny digits run: an int8 bundle whose manifest numbers are the
int8 model's own (check-bundle reproduces them), or a refusal naming both EERs and writing nothing."""

from __future__ import annotations

import onnx
import pytest
from typer.testing import CliRunner

pytest.importorskip("tensorflow")

from bundle import load_bundle
from training import quantize as q
from training.cli import app
from training.config import RunConfig
from training.workflows.check_bundle import check_bundle
from training.workflows.runs import ensure_run

CONFIG = RunConfig(
    dataset="digits", heldout_classes=["6", "7", "8", "9"], feature_dim=4, width=2, epochs=2, seed=0
)
FAST = ["--max-genuine", "2000", "--max-impostor", "5000", "--trials", "2", "--pca-components", "0"]
runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return ensure_run(CONFIG, tmp_path_factory.mktemp("q") / "run", verbose=0)


@pytest.mark.slow
def test_export_int8_records_both_eers_and_its_numbers_reproduce(run_dir, tmp_path) -> None:
    out = tmp_path / "int8"
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(out), "--quantize", "int8", *FAST])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(out)
    qr = bundle.manifest.quantization
    assert qr is not None and qr.method == "static-int8" and qr.max_eer_increase == q.MAX_EER_INCREASE
    assert qr.weight_bits == 7  # no CPU's int8 kernel saturates (training/quantize.py)
    assert qr.int8_eer <= qr.fp32_eer + q.MAX_EER_INCREASE
    assert qr.min_mean_cosine == q.MIN_INT8_MEAN_COSINE and qr.mean_cosine_to_fp32 >= q.MIN_INT8_MEAN_COSINE
    # Both graphs timed on this machine (values depend on it; that they were measured is what is checked).
    assert qr.fp32_images_per_s > 0 and qr.int8_images_per_s > 0 and "onnxruntime" in qr.speed_measured_on
    assert ", int8: " in qr.speed_measured_on  # names the CPU's int8 instructions (bundle/host.py)
    assert bundle.manifest.evaluation["eer"] == pytest.approx(qr.int8_eer, abs=1e-6)
    assert bundle.manifest.evaluation["quantized_from_fp32_eer"] == pytest.approx(qr.fp32_eer, abs=1e-6)
    assert "QLinearConv" in {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert f"int8 (static-int8): held-out EER {qr.int8_eer:.4f} vs fp32 {qr.fp32_eer:.4f}" in result.output
    # The manifest describes the served (int8) graph: re-measuring it with onnxruntime agrees.
    assert check_bundle(out).ok


@pytest.mark.slow
def test_export_int8_refusal_names_both_eers_and_writes_nothing(run_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(q, "MAX_EER_INCREASE", -1.0)
    out = tmp_path / "int8"
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(out), "--quantize", "int8", *FAST])
    assert result.exit_code == 2
    assert "(int8) vs" in result.output and "(fp32)" in result.output and "no bundle written" in result.output
    assert not out.exists()
    bad = runner.invoke(app, ["export", str(run_dir), "--out", str(out), "--quantize", "int4", *FAST])
    assert bad.exit_code == 2 and "--quantize must be int8" in bad.output


@pytest.mark.slow
def test_export_int8_that_is_not_the_same_model_is_refused_and_writes_nothing(
    run_dir, tmp_path, monkeypatch
) -> None:
    # A required mean cosine no model reaches: the fidelity gate refuses before the EER is even computed.
    monkeypatch.setattr(q, "MIN_INT8_MEAN_COSINE", 1.5)
    out = tmp_path / "int8"
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(out), "--quantize", "int8", *FAST])
    assert result.exit_code == 2, result.output
    assert "mean cosine of 0." in result.output and "under the required 1.5" in result.output
    assert "not the same model" in result.output and not out.exists()
    bad = runner.invoke(app, ["export", str(run_dir), "--out", str(out), "--quantize", "int4", *FAST])
    assert bad.exit_code == 2 and "--quantize must be int8" in bad.output
