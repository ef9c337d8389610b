"""An int8 bundle served on a CPU without int8 dot-product instructions says so at load
(service/model_slot.py): that int8 gains less here (naming the CPU's instructions and what the quantizing
machine measured), and, for a bundle with 8-bit weights, that its products saturate here. fp32 bundles and
CPUs with VNNI, or whose instructions are unknown, load silently."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from bundle import write_bundle
from bundle.host import Int8Support
from service import model_slot
from service.core.config import Settings
from service.model import EmbeddingModel
from testkit import tiny_bundle
from testkit.service_helpers import TinyBundle

AVX2 = Int8Support("AVX2", False, "VNNI")
QUANTIZATION = {
    "method": "static-int8",
    "weight_bits": 7,
    "fp32_eer": 0.05,
    "int8_eer": 0.051,
    "max_eer_increase": 0.005,
    "fp32_sha256": "0" * 64,
    "fp32_bytes": 1000,
    "num_images": 40,
    "fp32_images_per_s": 800.0,
    "int8_images_per_s": 2000.0,
    "speed_measured_on": "Intel Xeon Processor, x86_64, 2 CPUs, int8: AVX512-VNNI",
}


def _int8_bundle(directory: Path, tiny: TinyBundle, **quantization: object) -> Path:
    """The tiny bundle's graph with a manifest that records a quantization (the service reads only that)."""
    fields = tiny_bundle.manifest_fields(name="tiny-int8")
    fields["quantization"] = {**QUANTIZATION, **quantization}
    model = EmbeddingModel.load(tiny.path)
    write_bundle(
        directory,
        manifest=fields,
        model_bytes=model.bundle.model_bytes,
        centers=np.asarray(model.bundle.centers),
        labels=list(model.bundle.labels),
    )
    return directory


@pytest.fixture
def int8_bundle(tmp_path: Path, tiny: TinyBundle) -> Path:
    return _int8_bundle(tmp_path / "int8", tiny)


def test_an_int8_bundle_on_a_cpu_without_vnni_is_named_with_both_speeds(int8_bundle, caplog) -> None:
    model = EmbeddingModel.load(int8_bundle)
    with caplog.at_level(logging.WARNING, logger="idembed.model"):
        assert model_slot.int8_warnings(model, AVX2) == ["speed"]
    (record,) = caplog.records
    text = record.getMessage()
    assert "tiny-int8:1 is an int8 model (static-int8)" in text and "AVX2 without VNNI" in text
    assert (
        "Intel Xeon Processor, x86_64, 2 CPUs, int8: AVX512-VNNI) it ran 2000 img/s against fp32's 800"
        in text
    )
    assert record.int8_instructions == "AVX2" and record.model_id == "tiny-int8:1"


@pytest.mark.parametrize("bits", [8, None])
def test_8_bit_weights_on_a_cpu_without_vnni_are_said_to_saturate(tmp_path, tiny, bits, caplog) -> None:
    """Bundles made before 7-bit weights (no `weight_bits`) and 8-bit ones: their products saturate here."""
    model = EmbeddingModel.load(_int8_bundle(tmp_path / "b", tiny, weight_bits=bits))
    with caplog.at_level(logging.WARNING, logger="idembed.model"):
        assert model_slot.int8_warnings(model, AVX2) == ["saturation", "speed"]
    saturation = caplog.records[0]
    assert saturation.int8_concern == "saturation"
    text = saturation.getMessage()
    assert "8-bit weights" in text and "saturate here" in text
    assert f"gate (measured on: {QUANTIZATION['speed_measured_on']}) holds here only" in text
    with caplog.at_level(logging.WARNING, logger="idembed.model"):
        assert model_slot.int8_warnings(model, Int8Support("AVX512-VNNI", True)) == []


@pytest.mark.parametrize(
    "support", [Int8Support("AVX512-VNNI", True), Int8Support("SDOT", True), Int8Support("unknown", None)]
)
def test_no_warning_where_int8_has_dot_products_or_nothing_is_known(int8_bundle, support, caplog) -> None:
    model = EmbeddingModel.load(int8_bundle)
    with caplog.at_level(logging.WARNING, logger="idembed.model"):
        assert model_slot.int8_warnings(model, support) == []
    assert caplog.records == []


def test_an_fp32_bundle_never_warns(tiny: TinyBundle, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="idembed.model"):
        assert model_slot.int8_warnings(EmbeddingModel.load(tiny.path), AVX2) == []
    assert caplog.records == []


def test_loading_the_served_model_checks_this_cpu(int8_bundle, make_settings, monkeypatch, caplog) -> None:
    """ModelSlot.load (start-up, reload, restart) is where the check runs, against this machine's CPU."""
    monkeypatch.setattr(model_slot, "int8_support", lambda: AVX2)
    settings: Settings = make_settings(bundle_path=int8_bundle)
    with caplog.at_level(logging.WARNING, logger="idembed.model"):
        loaded = model_slot.ModelSlot(settings).load(int8_bundle)
    assert loaded.model_id == "tiny-int8:1"
    assert [(r.int8_instructions, r.int8_concern) for r in caplog.records] == [("AVX2", "speed")]
