"""Where a /v1/embed request's time goes in the live server, stage by stage, from py-spy samples.

    python bench/stage_profile.py --bundle bench/results/bundles/facecnn-112-rgb   # 1 request at a time
    python bench/stage_profile.py --bundle ... --concurrency 32 --seconds 8        # under load
    python bench/stage_profile.py --bundle ... --repo /path/to/other/checkout      # A/B another version

Starts the service (`python -m service.cli` of `--repo`, default this checkout) on the bundle, drives it with
the keep-alive client of bench/embed_bench.py (one 1-image JSON request at a time, or `--concurrency`
connections in a closed loop), and samples every thread with `py-spy record --threads --idle` (pip install
py-spy; it needs ptrace rights over the server, e.g. root). Each sample of the event-loop thread is put in
the stage of the innermost service or library function on its stack that names one (table below); samples
with nothing but the loop itself on the stack are the loop waiting. Stage times are sample counts divided
by the sampling rate and the requests served, so they are CPU-or-waiting time of that thread per request;
with one request at a time the stages add up to the server's share of the client latency. Takes ~20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import embed_bench as eb

from service.model import EmbeddingModel

# (marker, stage): a frame whose text contains the marker belongs to that stage. A sample goes to the stage
# of the innermost frame that has one; library frames without one (numpy, PIL, logging, ...) count for the
# service or framework function that called them.
MARKERS: list[tuple[str, str]] = [
    ("onnxruntime", "onnxruntime (on this thread)"),
    ("decode_base64", "base64"),
    ("decode_image", "image decode (Pillow)"),
    ("bundle/preprocess.py", "preprocess (convert, resize, normalise, stack)"),
    ("ImagePreprocessor", "preprocess (convert, resize, normalise, stack)"),
    ("service/api/bodies.py", "body receive + JSON parse"),
    ("starlette/requests.py", "body receive + JSON parse"),
    ("service/api/responses.py", "response JSON"),
    ("starlette/responses.py", "response JSON"),
    ("service/engine.py", "engine: queue, hand-off, results"),
    ("service/api/middleware.py", "request middleware: id, metrics, access log"),
    ("service/core/logging.py", "request middleware: id, metrics, access log"),
    ("service/api/metrics.py", "request middleware: id, metrics, access log"),
    ("service/api/hot_routes.py", "routing, auth, runtime"),
    ("service/api/deps.py", "routing, auth, runtime"),
    ("service/api/auth.py", "routing, auth, runtime"),
    ("service/api/routes/", "routing, auth, runtime"),
    ("service/runtime.py", "routing, auth, runtime"),
    ("uvicorn/protocols/", "HTTP parse + send (uvicorn, httptools)"),
    ("uvicorn/middleware/", "framework layers (FastAPI/Starlette stack)"),
    ("fastapi/", "framework layers (FastAPI/Starlette stack)"),
    ("starlette/", "framework layers (FastAPI/Starlette stack)"),
]
# With uvloop the loop itself is C: an idle loop thread's stack ends in the frame that started it.
IDLE_LEAVES = ("Runner.run", "select (selectors.py", "_run_once", "BaseEventLoop.run_forever", "run (uvicorn")


def classify(frames: list[str]) -> str:
    if any("onnxruntime" in f for f in frames):
        return MARKERS[0][1]
    for frame in reversed(frames):  # innermost first
        for marker, stage in MARKERS:
            if marker in frame:
                return stage
    leaf = frames[-1] if frames else ""
    return (
        "loop waiting (idle)" if any(leaf.startswith(x) for x in IDLE_LEAVES) else "other (asyncio, awaits)"
    )


def read_samples(raw: Path) -> tuple[dict[str, collections.Counter[str]], collections.Counter[str]]:
    """py-spy raw output -> per-thread stage counts, and per-thread total samples."""
    stages: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        thread, *frames = stack.split(";")
        name = thread.split(": ", 1)[-1]
        n = int(count)
        totals[name] += n
        if name.startswith("idembed-infer"):
            leaf = frames[-1] if frames else ""
            stages[name][
                "onnxruntime"
                if "onnxruntime" in stack
                else (
                    "idle"
                    if "get" in leaf or "wait" in leaf.lower() or "_serve_jobs" in leaf or "_worker" in leaf
                    else "python"
                )
            ] += n
        else:
            stages[name][classify(frames)] += n
    return stages, totals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--repo", type=Path, default=eb.REPO, help="checkout whose service runs (default: this)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=8.0, help="profiled time")
    p.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--out", type=Path, default=eb.RESULTS / "stage_profile.json")
    eb.add_server_env_argument(p, "IDEMBED_INFERENCE_WORKERS=1")
    args = p.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy not found: pip install py-spy")
    model = EmbeddingModel.load(args.bundle)
    pngs = eb.sample_pngs(model, 64, 0)
    del model
    requests = [eb.embed_request([b]) for b in pngs]
    server_args = argparse.Namespace(
        max_batch_size=32, batch_wait_ms=0.0, log_level=args.log_level, inline_max_ms=0.5, server_env=[]
    )
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "samples.txt"
        port = eb.free_port()
        server = eb.start_server(
            server_args,
            args.bundle.resolve(),
            port,
            Path(tmp),
            dict(args.server_env),
            repo=args.repo.resolve(),
        )
        try:
            asyncio.run(eb.http_latency(port, requests, 200))  # warm-up
            record = subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--format",
                    "raw",
                    "-o",
                    str(raw),
                    "-r",
                    str(args.rate),
                    "--threads",
                    "--idle",
                    "--nonblocking",
                    "-d",
                    str(int(args.seconds) + 1),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.7)  # py-spy attached
            start = time.perf_counter()
            if args.concurrency == 1:
                latencies: list[float] = []
                while time.perf_counter() - start < args.seconds:
                    latencies += asyncio.run(eb.http_latency(port, requests, 200))
                served, p50 = len(latencies) + 20 * (len(latencies) // 200), eb.ms(latencies, 0.5)
                rate = None
            else:
                phase = asyncio.run(
                    eb.http_throughput(port, server.pid, requests, 1, args.concurrency, args.seconds - 0.5)
                )
                served = round(phase.requests_per_s * (time.perf_counter() - start))
                p50, rate = None, phase.requests_per_s
            record.wait(60)
        finally:
            server.stop()
        stages, totals = read_samples(raw)
    loop_thread = next(t for t in totals if "MainThread" in t)
    per_request = {s: n / args.rate / served * 1000 for s, n in stages[loop_thread].most_common()}
    infer = collections.Counter()
    for name, counts in stages.items():
        if name.startswith("idembed-infer"):
            infer.update(counts)
    result = {
        "repo": str(args.repo),
        "concurrency": args.concurrency,
        "requests": served,
        "client_p50_ms": p50,
        "requests_per_s": rate,
        "loop_thread_ms_per_request": per_request,
        "inference_threads_ms_per_request": {k: v / args.rate / served * 1000 for k, v in infer.items()},
        "server_env": dict(args.server_env),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    head = f"client p50 {p50:.3f} ms" if p50 is not None else f"{rate:.0f} requests/s"
    print(f"{args.repo} -- {served} requests, concurrency {args.concurrency}, {head}")
    print("| event-loop thread, per request | ms |\n| --- | --- |")
    for stage, value in per_request.items():
        print(f"| {stage} | {value:.3f} |")
    infer_ms = result["inference_threads_ms_per_request"]
    print(
        "inference threads, per request (all together): "
        + ", ".join(f"{k} {v:.3f} ms" for k, v in infer_ms.items())
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
