"""bench/ort_ab.py: interleaved raw onnxruntime rounds, each graph paired against the first, JSON naming the
host's int8 instructions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testkit.onnx_graphs import conv_nchw
from testkit.server import REPO

SCRIPT = REPO / "bench" / "ort_ab.py"
DEFAULT = REPO / "models" / "default"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_rounds_pair_every_graph_with_the_first(tmp_path) -> None:
    small = tmp_path / "small.onnx"
    small.write_bytes(conv_nchw(size=16, channels=3))
    out = tmp_path / "ab.json"
    args = [str(small), str(DEFAULT), str(small), "--threads", "1", "--rounds", "3", "--seconds", "0.05"]
    done = _run(*args, "--batch", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    rows = result["threads"]["1"]
    assert [r["graph"] for r in rows] == [str(small), str(DEFAULT), str(small)]
    assert all(len(r["images_per_s"]) == 3 and min(r["images_per_s"]) > 0 for r in rows)
    assert rows[0]["ratio_to_first"] == [1.0, 1.0, 1.0]
    # The same graph twice: its ratio is a real measurement (not the reference copied), near 1.
    assert rows[2]["ratio_to_first"] != [1.0, 1.0, 1.0] and 0.2 < rows[2]["ratio_to_first"][0] < 5
    assert set(result["host"]) >= {"cpu_model", "int8_instructions", "int8_dot_product"}
    assert "| / first, median |" in done.stdout and "int8: " in done.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["only-one.onnx"], "at least two graphs"),
        ([str(DEFAULT), "missing.onnx"], "missing.onnx: neither an .onnx file nor a bundle folder"),
        ([str(DEFAULT), str(DEFAULT), "--threads", "one"], "--threads must be comma-separated integers"),
        ([str(DEFAULT), str(DEFAULT), "--rounds", "0"], "--rounds and --batch must be >= 1"),
    ],
)
def test_bad_arguments_are_refused_naming_them(args, needle) -> None:
    done = _run(*args)
    assert done.returncode != 0 and needle in done.stderr, done.stderr
