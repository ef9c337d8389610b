"""bundle/host.py: the CPU model and its int8 instructions, read from /proc/cpuinfo texts of real CPUs."""

from __future__ import annotations

import pytest

from bundle import host

# Shortened /proc/cpuinfo texts (first processor; real flag names, other flags left out).
INTEL_VNNI = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel Xeon Processor (Icelake)
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16

processor\t: 1
model name\t: Intel Xeon Processor (Icelake)
flags\t\t: fpu sse sse2 avx avx2
"""
INTEL_AMX = (
    "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 avx512bw avx512_vnni amx_int8 amx_tile\n"
)
ALDER_LAKE = "model name\t: 12th Gen Intel(R) Core(TM) i7-1265U\nflags\t\t: avx avx2 fma avx_vnni\n"
SKYLAKE_SP = "model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz\nflags\t\t: avx2 avx512f avx512bw\n"
AMD_ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2 sha_ni vaes vpclmulqdq
"""
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd aes sha2 asimddp sve i8mm bf16\n"
NEOVERSE_N1 = "processor\t: 0\nFeatures\t: fp asimd aes crc32 asimddp\n"
CORTEX_A53 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


@pytest.mark.parametrize(
    ("cpuinfo", "instructions", "dot_product", "shown"),
    [
        (INTEL_VNNI, "AVX512-VNNI", True, "AVX512-VNNI"),
        (INTEL_AMX, "AMX-INT8", True, "AMX-INT8"),
        (ALDER_LAKE, "AVX-VNNI", True, "AVX-VNNI"),
        (SKYLAKE_SP, "AVX512BW", False, "AVX512BW without VNNI"),
        (AMD_ZEN3, "AVX2", False, "AVX2 without VNNI"),
        (GRAVITON3, "I8MM", True, "I8MM"),
        (NEOVERSE_N1, "SDOT", True, "SDOT"),
        (CORTEX_A53, "NEON", False, "NEON without SDOT"),
        ("model name\t: Old CPU\nflags\t\t: fpu sse sse2\n", "none found", False, "none found"),
    ],
)
def test_the_best_int8_instructions_of_each_cpu(cpuinfo, instructions, dot_product, shown) -> None:
    support = host.int8_support(cpuinfo)
    assert (support.instructions, support.dot_product, str(support)) == (instructions, dot_product, shown)


def test_only_the_first_processor_counts_and_the_model_name_is_read() -> None:
    # The second processor of INTEL_VNNI lacks avx512_vnni: the first block decides.
    assert host.int8_support(INTEL_VNNI).dot_product is True
    assert host.cpu_model(INTEL_VNNI) == "Intel Xeon Processor (Icelake)"
    assert host.cpu_model(AMD_ZEN3) == "AMD EPYC"


def test_without_cpuinfo_nothing_is_claimed(monkeypatch) -> None:
    assert host.int8_support("") == host.Int8Support("unknown", None)
    assert str(host.int8_support("")) == "unknown"
    monkeypatch.setattr(host.platform, "processor", lambda: "arm")
    assert host.cpu_model("") == "arm"


def test_describe_names_the_cpu_and_its_int8_in_one_line() -> None:
    line = host.describe(AMD_ZEN3)
    assert line.startswith("AMD EPYC, ") and line.endswith(", int8: AVX2 without VNNI")
    assert f"{host.os.cpu_count()} CPUs" in line and len(host.describe("model name: " + "x" * 500)) < 200


def test_host_record_is_what_this_machine_says(monkeypatch, tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(AMD_ZEN3)
    monkeypatch.setattr(host, "CPUINFO", info)
    record = host.host_record()
    assert record["cpu_model"] == "AMD EPYC" and record["int8_instructions"] == "AVX2"
    assert record["int8_dot_product"] is False and record["cpus"] == host.os.cpu_count()
    monkeypatch.setattr(host, "CPUINFO", tmp_path / "missing")
    assert host.host_record()["int8_dot_product"] is None
