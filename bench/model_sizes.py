"""Serving speed per model size: /v1/embed against both onnxruntime ceilings (and Triton), one table.

    python bench/model_sizes.py --quick                          # the four models, 2 s phases (~8 min)
    python bench/model_sizes.py --models default,mobilefacenet --triton-python .venv-triton/bin/python
    python bench/suite.py --quick --skip identify,pg,serve       # the same table as part of the suite

Models: `default` (models/default: Conv-4 on 16x16 gray digits), `facecnn` (the project's ~1 M-parameter CNN,
112x112 RGB), `mobilefacenet` (2.06 M) and `iresnet50` (43.6 M), the arcface_torch architectures of
training/face_backbones.py at 112x112 RGB, 512-d. The face bundles are built with bench/face_bundle.py
under bench/results/bundles/ when missing: untrained but exported through the production path, because
inference cost depends on the graph (layer shapes and operators), not on the weight values.

Each load phase lasts `--seconds` (2 with --quick), or longer for a large model: at least about three full
batches at that concurrency (IResNet-50 at 32 on 2 cores: ~10 s). For each model, in one run on one machine
(compare ratios, not absolute figures, across machines):
- raw onnxruntime on ready tensors: one batch of `concurrency` images back to back, the fastest of
  embed_bench's session configurations (the ceiling of any server);
- onnxruntime + in-process decode: the same, but every call first decodes and preprocesses its PNGs with the
  service's own `ImagePreprocessor` (the ceiling of a server that receives encoded images, as /v1/embed does);
- /v1/embed: the service in its own process, `concurrency` keep-alive connections of one base64 PNG each;
- Triton (PyTriton, dynamic batching, the same per-image work) when `--triton-python` is given;
- single request: p50 of one sequential /v1/embed request vs one onnxruntime call on one ready tensor,
  sampled in alternating pairs so both see the same machine load, and the difference (the per-request
  overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import serve_bench
from embed_bench import RAW_CONFIGS, Connection
from PIL import Image

from bundle.preprocess import preprocess_pil
from service.model import EmbeddingModel
from service.preprocess import ImagePreprocessor
from testkit import ort_timing

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BUNDLES = RESULTS / "bundles"
CORES = len(os.sched_getaffinity(0))
# name -> bench/face_bundle.py arguments (None: an existing bundle of the repository)
MODELS: dict[str, list[str] | None] = {
    "default": None,
    "facecnn": ["--backbone", "facecnn", "--size", "112", "--color-mode", "RGB"],
    "mobilefacenet": ["--backbone", "mobilefacenet", "--size", "112"],
    "iresnet50": ["--backbone", "iresnet50", "--size", "112"],
}
TARGETS = ("onnxruntime in-process", "onnxruntime + decode", "idembed /v1/embed", "Triton (PyTriton) HTTP")


@dataclass
class ModelRun:
    model: str
    bundle: str
    parameters: int
    input: str
    server_env: dict[str, str]
    load: list[serve_bench.LoadRow] = field(default_factory=list)
    ort_single_p50_ms: float = 0.0
    service_single_p50_ms: float = 0.0
    overhead_ms: float = 0.0
    triton: str = ""


def bundle_path(name: str) -> Path:
    """The model's bundle; a face bundle is built (TensorFlow export, in its own process) when missing."""
    if MODELS[name] is None:
        return REPO / "models" / name
    path = BUNDLES / f"{name}-112-rgb"
    if not (path / "manifest.json").is_file():
        print(f"building {path} (untrained {name}, TensorFlow export) ...", flush=True)
        cmd = [sys.executable, str(REPO / "bench" / "face_bundle.py"), *MODELS[name], "--out", str(path)]  # type: ignore[misc]
        done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise BundleUnavailable(
                f"{name}: bench/face_bundle.py failed (it needs the train extra, TensorFlow): "
                f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
            )
    return path


class BundleUnavailable(RuntimeError):
    """A model's benchmark bundle is missing and could not be built."""


def parameter_count(bundle: Path) -> int:
    import onnx

    graph = onnx.load(str(bundle / "model.onnx")).graph
    return int(sum(np.prod(t.dims) for t in graph.initializer))


def decode_rows(
    bundle: Path, pngs: list[bytes], levels: list[int], seconds: float
) -> list[serve_bench.LoadRow]:
    """onnxruntime + in-process decode per concurrency level: every call decodes and preprocesses its PNGs
    (the service's ImagePreprocessor) and runs them as one batch; the fastest session configuration wins,
    like serve_bench.raw_ort_rows (the one-caller-per-core configuration decodes in parallel threads)."""
    rows = []
    for c in levels:
        batch = np.empty(c, dtype=object)
        batch[:] = [pngs[i % len(pngs)] for i in range(c)]
        best: serve_bench.LoadRow | None = None
        for name, (options, callers) in RAW_CONFIGS.items():
            model = EmbeddingModel.load(bundle, options)
            m = model.manifest
            pre = ImagePreprocessor(m.preprocessing, m.input, max_pixels=m.input.height * m.input.width * 4)

            def run(part: np.ndarray, model: EmbeddingModel = model, pre: ImagePreprocessor = pre) -> None:
                model.run(pre(list(part)))

            lat, images, elapsed = ort_timing.call_times(run, batch, seconds / len(RAW_CONFIGS), callers)
            row = serve_bench.LoadRow(
                "onnxruntime + decode",
                c,
                images / elapsed,
                serve_bench.pct_ms(lat, 50),
                serve_bench.pct_ms(lat, 99),
                0,
                f"batch of {c} PNGs, {name}",
            )
            if best is None or row.images_per_s > best.images_per_s:
                best = row
            del model
        assert best is not None
        rows.append(best)
    return rows


PAIR_BLOCK = 8


async def paired_single_latency(
    bundle: Path, one: np.ndarray, port: int, requests: list[bytes], seconds: float
) -> tuple[float, float]:
    """(onnxruntime p50 ms, /v1/embed p50 ms) of one image, sampled in alternating blocks: PAIR_BLOCK
    in-process onnxruntime calls on a ready tensor (each single-caller session configuration in turn; the
    faster one's p50 counts), then PAIR_BLOCK sequential requests, so both see the same machine load, which
    on a shared host moves more than the overhead being measured. (Pairs of one call and one request timed
    each side with the other's data in the caches: facecnn 1.7-2.0 ms of "overhead", against 0.88 ms in
    blocks.)"""
    # Their threads stop spinning when a call ends (as the service's lone-batch session's do): a session left
    # spinning in this process would take the cores from the server's next request and be timed as its
    # overhead (measured: MobileFaceNet 21.4 ms per request paired with spinning sessions, 13.2 ms alone).
    models = [
        EmbeddingModel.load(bundle, replace(o, stop_spinning_after_run=True))
        for o, callers in RAW_CONFIGS.values()
        if callers == 1
    ]
    conn = await Connection.open(port)
    ort: list[list[float]] = [[] for _ in models]
    svc: list[float] = []
    start = time.perf_counter()
    i = 0
    # Blocks of PAIR_BLOCK calls, alternating: the first call of each block only warms the caches back up
    # (a raw call evicts the server's weights and activations, and a request the client's), so each side is
    # timed as a caller that repeats it sees it; alternating blocks keeps both in the same machine load.
    while i < 2 * PAIR_BLOCK or (time.perf_counter() - start < seconds and i < 2000):
        for model, times in zip(models, ort, strict=True):
            for k in range(PAIR_BLOCK):
                t = time.perf_counter()
                model.run(one)
                if k:
                    times.append(time.perf_counter() - t)
        await asyncio.sleep(0.002)  # let onnxruntime's spinning threads go idle before the requests
        for k in range(PAIR_BLOCK):
            t = time.perf_counter()
            status = await conn.request(requests[i % len(requests)])
            if k:
                svc.append(time.perf_counter() - t)
            if status != 200:
                raise SystemExit(f"/v1/embed answered {status}")
            i += 1
    conn.close()
    warm = slice(PAIR_BLOCK, None)  # the first block warms both sides up
    best_ort = min(float(np.median(times[warm])) for times in ort)
    return best_ort * 1e3, float(np.median(svc[warm])) * 1e3


def measure(name: str, args: argparse.Namespace) -> ModelRun:
    bundle = bundle_path(name)
    model = EmbeddingModel.load(bundle)
    m = model.manifest
    pngs = serve_bench.sample_pngs(model, 64, args.seed)
    del model
    tensors = np.stack([preprocess_pil(Image.open(io.BytesIO(b)), m.preprocessing, m.input) for b in pngs])
    while len(tensors) < max(args.concurrency):
        tensors = np.concatenate([tensors, tensors])
    # A face model gets one inference worker per core (as the suite's face run); the toy model the default.
    env = dict(args.server_env)
    if name != "default":
        env.setdefault("IDEMBED_INFERENCE_WORKERS", str(CORES))
    run = ModelRun(
        name,
        str(bundle),
        parameter_count(bundle),
        f"{m.input.height}x{m.input.width}x{m.input.channels}",
        env,
    )
    per_image_s = time_per_image(bundle, tensors[:8])

    def phase_s(c: int) -> float:
        """Phase length at concurrency c: `--seconds`, or ~3 full batches for a large model (at most 6x
        `--seconds`: on a busy host the estimate can be several times the quiet figure)."""
        return min(max(args.seconds, 3 * c * per_image_s), 6 * args.seconds)

    print(
        f"-- {name}: {bundle} ({run.parameters:,} parameters, ~{per_image_s * 1e3:.1f} ms/image) {env}",
        flush=True,
    )
    for c in args.concurrency:
        run.load += serve_bench.raw_ort_rows(bundle, tensors, [c], phase_s(c))
        run.load += decode_rows(bundle, pngs, [c], phase_s(c))

    requests = [serve_bench.embed_request([b]) for b in pngs]
    svc_args = argparse.Namespace(**{**vars(args), "bundle": bundle, "server_env": list(env.items())})
    with tempfile.TemporaryDirectory() as tmp:
        server = serve_bench.start_service(svc_args, Path(tmp) / "bench.sqlite3")
        try:
            asyncio.run(serve_bench.closed_loop(server.port, requests, max(args.concurrency), 1.0))
            run.ort_single_p50_ms, run.service_single_p50_ms = asyncio.run(
                paired_single_latency(bundle, tensors[:1], server.port, requests, args.seconds)
            )
            for c in args.concurrency:
                run.load += serve_bench.http_rows("idembed /v1/embed", server.port, requests, [c], phase_s(c))
        finally:
            server.stop()
    run.overhead_ms = run.service_single_p50_ms - run.ort_single_p50_ms
    run.triton = triton_rows(args, bundle, pngs, phase_s, run.load)
    return run


def time_per_image(bundle: Path, batch: np.ndarray) -> float:
    """Rough seconds per image of one onnxruntime call on `batch` (default session), to size the phases."""
    model = EmbeddingModel.load(bundle)
    model.run(batch)
    t = time.perf_counter()
    model.run(batch)
    return (time.perf_counter() - t) / len(batch)


def triton_rows(
    args: argparse.Namespace,
    bundle: Path,
    pngs: list[bytes],
    phase_s: Callable[[int], float],
    rows: list[serve_bench.LoadRow],
) -> str:
    """Triton (PyTriton) rows at every concurrency, appended to `rows`; returns "ok" or why skipped."""
    note, triton = serve_bench.triton_load(
        args.triton_python,
        bundle,
        args.max_batch_size,
        pngs,
        args.concurrency,
        phase_s,
        warmup=(max(args.concurrency), 1.0),
    )
    rows += triton
    return note


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(runs: list[ModelRun]) -> str:
    """Markdown: one row per model and concurrency, then one single-request row per model."""
    lines = [
        "| model | params | input | conc | raw ORT img/s | ORT + decode img/s | /v1/embed img/s "
        "| Triton img/s | /v1/embed / raw ORT | / ORT + decode | / Triton |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        by = {(row.target, row.concurrency): row.images_per_s for row in r.load}
        for c in sorted({row.concurrency for row in r.load}):
            raw, dec, svc, tri = (by.get((t, c)) for t in TARGETS)
            cells = [f"{v:,.0f}" if v else "-" for v in (raw, dec, svc, tri)]
            lines.append(
                f"| {r.model} | {r.parameters / 1e6:.2f} M | {r.input} | {c} | {' | '.join(cells)} "
                f"| {ratio(svc, raw)} | {ratio(svc, dec)} | {ratio(svc, tri)} |"
            )
    lines += [
        "",
        "| model | ORT 1 image p50 ms | /v1/embed 1 request p50 ms | overhead ms | /v1/embed / ORT |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.model} | {r.ort_single_p50_ms:.2f} | {r.service_single_p50_ms:.2f} | {r.overhead_ms:.2f} "
            f"| {r.service_single_p50_ms / r.ort_single_p50_ms:.2f}x |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated models to measure, of {', '.join(MODELS)} (default: all)",
    )


def check_models(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        p.error(f"--models: unknown or no model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    return names


def run_all(names: list[str], args: argparse.Namespace) -> list[ModelRun]:
    runs = []
    for name in names:
        try:
            runs.append(measure(name, args))
        except BundleUnavailable as exc:
            print(f"skipped {exc}", flush=True)
            continue
        print(table(runs[-1:]), flush=True)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_bench.add_arguments(p)
    add_arguments(p)
    p.add_argument("--quick", action="store_true", help="2 s phases")
    p.add_argument("--json", type=Path, default=RESULTS / "model_sizes.json")
    args = p.parse_args()
    names = check_models(p, args)
    if args.quick:
        args.seconds = 2.0
    if args.seconds <= 0:
        p.error("--seconds must be > 0")
    runs = run_all(names, args)
    print("\n" + table(runs))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
