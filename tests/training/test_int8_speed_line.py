"""What `export`/`import --quantize int8` print about speed: this machine's figures, and, on a CPU without an
int8 dot-product instruction, why int8 gains less here (bundle/host.py)."""

from __future__ import annotations

import pytest

from bundle.host import Int8Support
from bundle.manifest import Quantization
from training import cli

RECORD = Quantization(
    method="static-int8",
    weight_bits=7,
    fp32_eer=0.01,
    int8_eer=0.011,
    max_eer_increase=0.005,
    fp32_sha256="0" * 64,
    fp32_bytes=10,
    num_images=8,
    fp32_images_per_s=300.0,
    int8_images_per_s=520.0,
    speed_measured_on="AMD EPYC, x86_64, 2 CPUs, int8: AVX2 without VNNI",
)


def test_a_cpu_without_vnni_is_named_with_the_figures(monkeypatch) -> None:
    monkeypatch.setattr(cli, "int8_support", lambda: Int8Support("AVX2", False, "VNNI"))
    line = cli._int8_speed(RECORD)
    assert line.startswith("raw onnxruntime here 520 vs 300 img/s (this CPU's int8 is AVX2 without VNNI")
    assert "int8 gains less here" in line


@pytest.mark.parametrize("support", [Int8Support("AVX512-VNNI", True), Int8Support("unknown", None)])
def test_otherwise_only_the_figures(monkeypatch, support) -> None:
    monkeypatch.setattr(cli, "int8_support", lambda: support)
    assert cli._int8_speed(RECORD) == "raw onnxruntime here 520 vs 300 img/s"
