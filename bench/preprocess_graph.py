"""Benchmark: the service's per-image cost with the normalisation in numpy vs inside the ONNX graph.

Two bundles of the same model (the face-size `facecnn`, `bench/face_bundle.py`): one as every bundle was
exported so far (float32 input: the service decodes, converts, resizes, then normalises in numpy), one with
the preprocessing subgraph (`--embed-preprocessing`: the service stops after the resize and feeds uint8; the
graph casts and normalises). In one process, rounds interleaved so load from other processes hits both alike,
it times what the service runs per request: `ImagePreprocessor` (the service's own decode + preprocessing) and
`EmbeddingModel.run` (onnxruntime + L2), at batch 1 and 32, on JPEGs at the model size (face crops: no
resize) and larger (a resize). Reports CPU microseconds per image (best round: load from other processes
only adds), and the saving.

    python bench/face_bundle.py --size 112 --color-mode RGB                        # float bundle
    python bench/face_bundle.py --size 112 --color-mode RGB --embed-preprocessing  # ...-u8
    python bench/preprocess_graph.py --quick                                       # ~1 min

Writes bench/results/preprocess_graph.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "preprocess_graph.json"


def _jpegs(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for k in range(n):
        base = np.stack(
            [
                128 + 90 * np.sin((xx + 7 * k) / 9.0),
                128 + 90 * np.cos(yy / (4.0 + k % 5)),
                np.full((h, w), 3.0 * k),
            ],
            -1,
        )
        pixels = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _time(fn, reps: int, clock=time.perf_counter) -> float:
    start = clock()
    for _ in range(reps):
        fn()
    return (clock() - start) / reps


def main() -> None:
    from bench.face_bundle import default_path
    from service.model import EmbeddingModel, RuntimeOptions
    from service.preprocess import ImagePreprocessor

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--float-bundle", type=Path, default=default_path(112, "RGB"))
    p.add_argument("--pixel-bundle", type=Path, default=None, help="[default: <float-bundle>-u8]")
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args()
    pixel_path = args.pixel_bundle or args.float_bundle.with_name(args.float_bundle.name + "-u8")
    rounds = args.rounds or (7 if args.quick else 21)
    # One onnxruntime thread, no spinning (what each of the service's inference workers runs with when there
    # are several): the model runs on the calling thread, so its thread CPU time is what it costs.
    options = RuntimeOptions(intra_op_threads=1, inter_op_threads=1, allow_spinning=False)
    models = {"float32 input (numpy normalise)": EmbeddingModel.load(args.float_bundle, options)}
    models["uint8 input (normalise in graph)"] = EmbeddingModel.load(pixel_path, options)
    for m in models.values():
        assert m.manifest.embedding.dim == next(iter(models.values())).manifest.embedding.dim
    spec = next(iter(models.values())).manifest.input
    pres = {
        k: ImagePreprocessor(m.manifest.preprocessing, m.manifest.input, max_pixels=10**8)
        for k, m in models.items()
    }
    sources = {
        f"{spec.width}x{spec.height} JPEG (no resize)": (spec.width, spec.height),
        "250x250 JPEG (resize)": (250, 250),
    }
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for src, size in sources.items():
            images = _jpegs(32, size)
            for batch in (1, 32):
                chunk = images[:batch]
                reps = max(1, 64 // batch)
                for name, model in models.items():
                    pre = pres[name]
                    x = pre(chunk)
                    # CPU time of this thread, not wall time: on a shared machine other processes' load
                    # inflates wall time (it only adds), while the CPU a call costs stays.
                    t_pre = _time(lambda pre=pre, chunk=chunk: pre(chunk), reps, time.thread_time) / batch
                    t_ort = _time(lambda model=model, x=x: model.run(x), reps, time.thread_time) / batch
                    for part, value in (
                        ("preprocess", t_pre),
                        ("onnxruntime", t_ort),
                        ("total", t_pre + t_ort),
                    ):
                        samples.setdefault(f"{src}|{batch}|{name}|{part}", []).append(value * 1e6)
    med = {k: round(min(v), 1) for k, v in samples.items()}
    names = list(models)
    rows = []
    for src in sources:
        for batch in (1, 32):
            row = {"images": src, "batch": batch}
            for name in names:
                for part in ("preprocess", "onnxruntime", "total"):
                    row[f"{name} {part} us"] = med[f"{src}|{batch}|{name}|{part}"]
            row["saving us/image"] = round(row[f"{names[0]} total us"] - row[f"{names[1]} total us"], 1)
            row["preprocess saving us/image"] = round(
                row[f"{names[0]} preprocess us"] - row[f"{names[1]} preprocess us"], 1
            )
            rows.append(row)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
        "bundles": {names[0]: str(args.float_bundle), names[1]: str(pixel_path)},
        "rounds": rounds,
        "method": "best of interleaved rounds of CPU microseconds per image (thread CPU time per call / "
        "batch); onnxruntime with 1 intra-op thread, no spinning, so it runs on the timed thread",
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {os.getloadavg()[0]:.1f}; best of {rounds} rounds; CPU µs per image\n")
    print(
        "| images | batch | preprocess f32 | preprocess u8 | ORT f32 | ORT u8 | total f32 | total u8 "
        "| saving |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        f, u = names
        print(
            f"| {r['images']} | {r['batch']} | {r[f + ' preprocess us']:.0f} | "
            f"{r[u + ' preprocess us']:.0f} | "
            f"{r[f + ' onnxruntime us']:.0f} | {r[u + ' onnxruntime us']:.0f} | {r[f + ' total us']:.0f} | "
            f"{r[u + ' total us']:.0f} | {r['saving us/image']:.0f} |"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
