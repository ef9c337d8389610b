"""int8 vs fp32 speed on the face-size model: raw onnxruntime, then /v1/embed in the service (embed_bench).

    python bench/int8_bench.py --quick            # ~2 min: short phases, 1 image/request, 2 workers
    python bench/int8_bench.py --size 112 --color-mode RGB --seconds 10
    python bench/int8_bench.py --quick --backbone mobilefacenet

The fp32 bundle is bench/face_bundle.py's (untrained `--backbone`, default facecnn, built if missing;
delete it after a change to the export); the int8 bundle beside it
holds `training.quantize.quantize_int8` of the same graph (the method `export/import --quantize int8` use),
with activation ranges from 128 images of sklearn digits resized to the model input. Its manifest is the
fp32 one with the int8 graph's digests: the weights are untrained, so accuracy (the EER gate) is not what
this measures; speed depends on the graph, not the weight values (see face_bundle.py). Writes
bench/results/int8_bench.json and prints a table. On a shared host the figures move with the other jobs:
say so when quoting them, and rerun without --quick on a quiet machine for final numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bundle.host import describe, host_record  # noqa: E402

RESULTS = REPO / "bench" / "results"


def fp32_bundle(size: int, color_mode: str, backbone: str = "facecnn") -> Path:
    path = RESULTS / "bundles" / f"{backbone}-{size}-{color_mode.lower()}"
    if not (path / "manifest.json").is_file():
        cmd = [sys.executable, str(REPO / "bench" / "face_bundle.py"), "--size", str(size)]
        cmd += ["--backbone", backbone, "--color-mode", color_mode, "--out", str(path)]
        subprocess.run(cmd, check=True, cwd=REPO)
    return path


def calibration_images(manifest, n: int = 128) -> np.ndarray:
    from sklearn.datasets import load_digits

    from bundle.preprocess import preprocess_image

    digits = np.rint(load_digits().images[:n] * (255.0 / 16.0)).astype(np.uint8)
    return np.stack([preprocess_image(d, manifest.preprocessing, manifest.input) for d in digits])


def int8_bundle(fp32: Path, method: str) -> tuple[Path, float]:
    from bundle.files import load_bundle, write_bundle
    from training.quantize import quantize_int8

    src = load_bundle(fp32)
    m = src.manifest
    started = time.perf_counter()
    int8 = quantize_int8(
        src.model_bytes, method=method, calibration=calibration_images(m), input_name=m.input.name
    )
    seconds = time.perf_counter() - started
    out = fp32.with_name(f"{fp32.name}-int8-{method}")
    fields = m.model_dump(exclude={"files"})
    fields["name"] = f"{m.name}-int8-{method}"
    write_bundle(out, manifest=fields, model_bytes=int8, centers=src.centers, labels=src.labels)
    return out, seconds


def raw_throughput(bundle: Path, batch: int, seconds: float, threads: int) -> float:
    from bundle.files import load_bundle

    b = load_bundle(bundle)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(b.model_bytes, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-1, 1, (batch, *b.manifest.input.shape(None)[1:])).astype(np.float32)
    feed = {b.manifest.input.name: x}
    sess.run(None, feed)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, feed)
        n += 1
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="facecnn", help="bench/face_bundle.py's --backbone")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--color-mode", choices=["L", "RGB"], default="RGB")
    p.add_argument("--method", choices=["static", "dynamic"], default="static")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="each service throughput phase")
    p.add_argument("--raw-seconds", type=float, default=5.0, help="each raw onnxruntime phase")
    p.add_argument("--quick", action="store_true", help="3 s phases, 1 image/request, 2 inference workers")
    p.add_argument("--no-service", action="store_true", help="raw onnxruntime only")
    p.add_argument("--out", type=Path, default=RESULTS / "int8_bench.json")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.raw_seconds = 3.0, 2.0
    fp32 = fp32_bundle(args.size, args.color_mode, args.backbone)
    int8, quantize_s = int8_bundle(fp32, args.method)
    cores = os.cpu_count() or 1
    raw = {}
    for label, bundle in (("fp32", fp32), ("int8", int8)):
        raw[label] = {
            f"{t}_thread{'s' if t > 1 else ''}": round(
                raw_throughput(bundle, args.concurrency, args.raw_seconds, t)
            )
            for t in sorted({1, cores})
        }
    result: dict = {
        "command": " ".join(["python", "bench/int8_bench.py", *sys.argv[1:]]),
        "method": args.method,
        "quantize_seconds": round(quantize_s, 2),
        "model_bytes": {
            "fp32": (fp32 / "model.onnx").stat().st_size,
            "int8": (int8 / "model.onnx").stat().st_size,
        },
        "raw_ort_images_per_s": raw,
        "cpu_count": cores,
        # What int8 buys depends on the CPU's int8 instructions (VNNI or not): bundle/host.py.
        "host": host_record(),
        "load_average_before_service": [round(x, 2) for x in os.getloadavg()],
    }
    if not args.no_service:
        service_json = args.out.with_name(args.out.stem + "_service.json")
        cmd = [sys.executable, str(REPO / "bench" / "embed_bench.py"), "--bundle", str(fp32), "--bundle"]
        cmd += [
            str(int8),
            "--no-face",
            "--concurrency",
            str(args.concurrency),
            "--seconds",
            str(args.seconds),
        ]
        cmd += ["--raw-seconds", str(args.raw_seconds), "--out", str(service_json), "--log-level", "WARNING"]
        if args.quick:
            cmd += [
                "--latency-requests",
                "100",
                "--images-per-request",
                "1",
                "--inference-workers",
                str(cores),
            ]
        subprocess.run(cmd, check=True, cwd=REPO)
        runs = json.loads(service_json.read_text())["runs"]
        result["service"] = {
            label: [
                {
                    "inference_workers": srv["inference_workers"],
                    "images_per_request": ph["images_per_request"],
                    "images_per_s": round(ph["images_per_s"]),
                    "mean_batch_size": round(ph["mean_batch_size"], 1),
                }
                for srv in run["servers"]
                for ph in srv["service"]
            ]
            for label, run in zip(("fp32", "int8"), runs, strict=True)
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"on {describe()}")
    print("| | fp32 | int8 | int8 / fp32 |\n|---|---|---|---|")
    for key in raw["fp32"]:
        f, i = raw["fp32"][key], raw["int8"][key]
        print(f"| raw onnxruntime, batch {args.concurrency}, {key} | {f} img/s | {i} img/s | {i / f:.2f}x |")
    for f, i in zip(
        result.get("service", {}).get("fp32", []), result.get("service", {}).get("int8", []), strict=True
    ):
        print(
            f"| /v1/embed, concurrency {args.concurrency}, {f['images_per_request']} img/req, "
            f"{f['inference_workers']} workers | {f['images_per_s']} img/s | {i['images_per_s']} img/s "
            f"| {i['images_per_s'] / f['images_per_s']:.2f}x |"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
