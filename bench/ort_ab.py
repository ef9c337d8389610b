"""Raw onnxruntime throughput of several graphs in interleaved rounds, each paired against the first.

    B=bench/results/bundles
    python bench/ort_ab.py $B/facecnn-112-rgb $B/facecnn-112-rgb-int8-static --threads 1,2 --rounds 8
    python bench/ort_ab.py fp32.onnx int8.onnx other.onnx --threads 1 --rounds 4

Each argument is a bundle folder (its model.onnx) or an .onnx file; the first is the reference. Every graph
gets one session per thread count, loaded once; each round runs each session for `--seconds` on one random
batch of `--batch` inputs (testkit/ort_timing's loop, a few warm-up calls first), in an order reversed
every other round, so a slow minute of a shared host hits every graph alike. Prints, per thread count, each
graph's median img/s and the median and range of its per-round ratio to the first (the figure to quote on a
noisy host); writes bench/results/ort_ab.json with every round and the host's CPU and int8 instructions
(bundle/host.py). ~rounds x graphs x seconds per thread count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bundle.host import describe, host_record
from testkit import ort_timing

RESULTS = Path(__file__).resolve().parent / "results"


def graph_file(path: Path) -> Path:
    model = path / "model.onnx" if path.is_dir() else path
    if not model.is_file():
        raise SystemExit(f"{path}: neither an .onnx file nor a bundle folder with model.onnx")
    return model


def session(model: Path, threads: int, batch: int) -> tuple[ort_timing.Run, np.ndarray]:
    """A session of `model` on `threads` intra-op threads as a `run(batch)` callable, and a random batch."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    shape = [batch, *(d if isinstance(d, int) and d > 0 else 1 for d in inp.shape[1:])]
    x = np.random.default_rng(0).uniform(-1, 1, shape)
    x = (x * 127 + 128).astype(np.uint8) if inp.type == "tensor(uint8)" else x.astype(np.float32)
    return (lambda b: sess.run(None, {inp.name: b})), x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("graphs", nargs="+", type=Path, help="bundles or .onnx files; the first is the reference")
    p.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=float, default=1.5, help="each graph's phase per round")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", type=Path, default=RESULTS / "ort_ab.json")
    a = p.parse_args()
    if len(a.graphs) < 2:
        raise SystemExit("give at least two graphs: the reference first")
    if a.rounds < 1 or a.seconds <= 0 or a.batch < 1:
        raise SystemExit("--rounds and --batch must be >= 1 and --seconds > 0")
    try:
        thread_counts = [int(t) for t in a.threads.split(",")]
    except ValueError:
        raise SystemExit(f"--threads must be comma-separated integers, got {a.threads!r}") from None
    models = [graph_file(g) for g in a.graphs]
    names = [str(g) for g in a.graphs]
    print(f"on {describe()}, onnxruntime {ort.__version__}, batch {a.batch}")
    result: dict = {"command": "python " + " ".join(sys.argv), "host": host_record(), "threads": {}}
    for threads in thread_counts:
        sessions = [session(m, threads, a.batch) for m in models]
        rates: list[list[float]] = [[] for _ in models]
        for r in range(a.rounds):
            order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
            for i in order:
                run, x = sessions[i]
                rates[i].append(ort_timing.throughput(run, x, a.seconds))
        rows = []
        print(f"\n{threads} thread(s), {a.rounds} rounds of {a.seconds:g} s")
        print("| graph | median img/s | / first, median | range |\n|---|---:|---:|---:|")
        for name, rs in zip(names, rates, strict=True):
            ratios = [x / y for x, y in zip(rs, rates[0], strict=True)]
            rows.append({"graph": name, "images_per_s": rs, "ratio_to_first": ratios})
            print(
                f"| {name} | {statistics.median(rs):.0f} | {statistics.median(ratios):.2f}x | "
                f"{min(ratios):.2f}-{max(ratios):.2f} |"
            )
        result["threads"][str(threads)] = rows
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
