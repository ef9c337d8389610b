"""The CPU a graph runs on, as far as int8 is concerned: its model name and its int8 dot-product instructions.

What an int8 graph buys over fp32 depends on the CPU more than on the graph. onnxruntime's int8 kernels
(MLAS) multiply-accumulate bytes in one instruction on CPUs with VNNI (AVX512-VNNI, AVX-VNNI) or AMX, and in
two with saturation on plain AVX2. Measured on the same 112x112 graphs, raw onnxruntime at batch 32, int8 /
fp32 is 2.3-2.6x on an Intel Xeon with VNNI and 1.7x (facecnn) / 2.0x (MobileFaceNet) on an AMD EPYC with
AVX2 only (docs/performance.md#int8-models). So every speed figure about int8 names the CPU: the manifest's
`quantization.speed_measured_on`, the service's start-up warning for an int8 bundle on a CPU without int8
dot products, and the benchmarks' JSON.

Read from /proc/cpuinfo (Linux). Elsewhere the model name is `platform.processor()` and the instructions are
unknown (`Int8Support.dot_product is None`): nothing is claimed that was not read.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# (flag in /proc/cpuinfo, name, a single-instruction int8 dot product?, what it lacks for one), best first:
# the first one present is what onnxruntime's int8 kernels use. x86 and Arm flags never meet.
_INSTRUCTIONS = (
    ("amx_int8", "AMX-INT8", True, ""),
    ("avx512_vnni", "AVX512-VNNI", True, ""),
    ("avx_vnni", "AVX-VNNI", True, ""),
    ("avx512bw", "AVX512BW", False, "VNNI"),
    ("avx2", "AVX2", False, "VNNI"),
    ("i8mm", "I8MM", True, ""),
    ("asimddp", "SDOT", True, ""),
    ("asimd", "NEON", False, "SDOT"),
)


@dataclass(frozen=True)
class Int8Support:
    """`instructions`: the best int8 instruction set found ("AVX2", "AVX512-VNNI", ...; "unknown");
    `dot_product`: whether it multiply-accumulates bytes in one instruction (None: could not tell)."""

    instructions: str
    dot_product: bool | None
    # What it lacks for one, in its vendor's word ("VNNI", "SDOT"); "" when it has one or nothing is known.
    lacks: str = ""

    def __str__(self) -> str:
        return f"{self.instructions} without {self.lacks}" if self.lacks else self.instructions


def _fields(text: str) -> dict[str, str]:
    """The first processor's `key: value` lines of a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def _cpuinfo() -> str:
    try:
        return CPUINFO.read_text(errors="replace")
    except OSError:
        return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name ("AMD EPYC", "Intel Xeon Processor", ...), or what `platform` knows."""
    fields = _fields(_cpuinfo() if cpuinfo is None else cpuinfo)
    name = fields.get("model name") or fields.get("hardware") or fields.get("cpu model") or ""
    return " ".join(name.split()) or platform.processor() or platform.machine() or "unknown CPU"


def int8_support(cpuinfo: str | None = None) -> Int8Support:
    """The int8 instructions of the CPU described by `cpuinfo` (default: this machine's /proc/cpuinfo)."""
    fields = _fields(_cpuinfo() if cpuinfo is None else cpuinfo)
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    if not flags:
        return Int8Support("unknown", None)
    for flag, name, dot_product, lacks in _INSTRUCTIONS:
        if flag in flags:
            return Int8Support(name, dot_product, lacks)
    return Int8Support("none found", False)


def describe(cpuinfo: str | None = None) -> str:
    """One line for a speed figure: "AMD EPYC, x86_64, 2 CPUs, int8: AVX2 without VNNI"."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    model = cpu_model(text)[:80]
    return f"{model}, {platform.machine()}, {os.cpu_count()} CPUs, int8: {int8_support(text)}"


def host_record() -> dict[str, object]:
    """The same facts as fields, for a benchmark's JSON."""
    text = _cpuinfo()
    support = int8_support(text)
    return {
        "cpu_model": cpu_model(text),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "int8_instructions": support.instructions,
        "int8_dot_product": support.dot_product,
    }
