"""Serving benchmark: /v1/embed vs raw onnxruntime vs Triton (PyTriton); memory under load; cold start.

Throughput and latency at several concurrencies, resident memory after warm-up and after N requests, and
process start to /readyz 200, all measured in one run on one machine, so compare ratios.

The HTTP client is `embed_bench.Connection` (keep-alive HTTP/1.1 on raw asyncio streams, closed loop, bounded
in time), the same for the service and for Triton, against 127.0.0.1 only. Both servers receive one base64
PNG per request and do the same work per image (decode, the bundle's preprocessing, onnxruntime, L2 norm);
raw onnxruntime is the model alone on ready tensors, one `session.run` on a batch of `concurrency` images.

    python bench/serve_bench.py --bundle models/default
    python bench/serve_bench.py --triton-python .venv-triton/bin/python --memory-requests 100000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from embed_bench import RAW_CONFIGS, Connection, add_server_env_argument, embed_request, sample_pngs
from identify_bench import int_list
from PIL import Image

from bundle.preprocess import preprocess_pil
from service.model import EmbeddingModel
from testkit.ort_timing import call_times
from testkit.server import ServerProcess, ServerStartError, free_port, rss_mib

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


@dataclass
class LoadRow:
    target: str
    concurrency: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    note: str = ""


@dataclass
class ServeReport:
    load: list[LoadRow] = field(default_factory=list)
    rss_mib_after_warmup: float = 0.0
    rss_mib_after_requests: float = 0.0
    requests_for_memory: int = 0
    rss_growth_pct: float = 0.0
    cold_start_s: list[float] = field(default_factory=list)
    triton: str = ""
    profile: str = ""


def server_settings(args: argparse.Namespace, store: Path) -> dict[str, str]:
    return {
        "IDEMBED_BUNDLE_PATH": str(args.bundle),
        "IDEMBED_STORE_URL": f"sqlite:///{store}",
        "IDEMBED_LOG_LEVEL": args.log_level,
        # The same batch limit as Triton's dynamic batcher.
        "IDEMBED_MAX_BATCH_SIZE": str(args.max_batch_size),
        # Reads are open: the load generator sends no key (the service's default requires one).
        "IDEMBED_REQUIRE_KEY_FOR_READS": "false",
        **dict(args.server_env),
    }


def start_service(args: argparse.Namespace, store: Path) -> ServerProcess:
    """The service on `args.bundle`, started; its `ready_s` is process start to /readyz 200."""
    server = ServerProcess(server_settings(args, store), store.with_suffix(".log"))
    return server.start(timeout_s=120)


def start_triton(python: Path, bundle: Path, max_batch_size: int, log: Path) -> ServerProcess:
    http, grpc, metrics = free_port(), free_port(), free_port()
    argv = [
        *(str(python), str(REPO / "bench" / "triton_server.py"), "--bundle", str(bundle)),
        *("--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)),
        *("--max-batch-size", str(max_batch_size)),
    ]
    server = ServerProcess({}, log, argv=argv, port=http, ready_path="/v2/models/idembed/ready")
    return server.start(timeout_s=180)


def triton_request(png: bytes) -> bytes:
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(png).decode()],
                }
            ]
        }
    ).encode()
    head = (
        f"POST /v2/models/idembed/infer HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def closed_loop(
    port: int, requests: list[bytes], concurrency: int, seconds: float, max_requests: int = 0
) -> tuple[float, list[float], int, int]:
    """`concurrency` connections each sending back-to-back requests for `seconds` (after a short warm-up),
    or until `max_requests` are done when > 0. Returns (requests/s, latencies s, errors, requests done)."""
    conns = [await Connection.open(port) for _ in range(concurrency)]
    latencies: list[float] = []
    errors = done = 0
    counting = False
    stop_event = asyncio.Event()

    async def worker(k: int, conn: Connection) -> None:
        nonlocal errors, done
        i = k
        while not stop_event.is_set():
            t = time.perf_counter()
            status = await conn.request(requests[i % len(requests)])
            i += concurrency
            if counting:
                latencies.append(time.perf_counter() - t)
                errors += status != 200
                done += 1
                if max_requests and done >= max_requests:
                    stop_event.set()

    tasks = [asyncio.create_task(worker(k, c)) for k, c in enumerate(conns)]
    await asyncio.sleep(min(1.0, seconds / 4))  # warm-up: connections open, batches at steady size
    counting, start = True, time.perf_counter()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop_event.wait(), timeout=seconds)
    counting = False
    elapsed = time.perf_counter() - start
    stop_event.set()
    await asyncio.gather(*tasks)
    for c in conns:
        c.close()
    return done / elapsed, latencies, errors, done


def pct_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q) * 1e3) if values else float("nan")


def raw_ort_rows(bundle: Path, tensors: np.ndarray, levels: list[int], seconds: float) -> list[LoadRow]:
    """Raw onnxruntime per concurrency level: a batch of that many ready tensors, back to back, in each of
    embed_bench's session configurations (default, no spinning, one single-threaded caller per core); the
    fastest configuration is the row, so the service is never compared with a weak baseline."""
    rows = []
    models = {
        name: (EmbeddingModel.load(bundle, options), callers)
        for name, (options, callers) in RAW_CONFIGS.items()
    }
    for c in levels:
        batch = tensors[:c]
        best: LoadRow | None = None
        for name, (model, callers) in models.items():
            lat, images, elapsed = call_times(model.run, batch, seconds / len(models), callers)
            row = LoadRow(
                "onnxruntime in-process",
                c,
                images / elapsed,
                pct_ms(lat, 50),
                pct_ms(lat, 99),
                0,
                f"batch of {c}, {name}",
            )
            if best is None or row.images_per_s > best.images_per_s:
                best = row
        assert best is not None
        rows.append(best)
    return rows


def http_rows(
    target: str, port: int, requests: list[bytes], levels: list[int], seconds: float
) -> list[LoadRow]:
    rows = []
    for c in levels:
        rps, lat, errors, _ = asyncio.run(closed_loop(port, requests, c, seconds))
        rows.append(LoadRow(target, c, rps, pct_ms(lat, 50), pct_ms(lat, 99), errors))
    return rows


def profile_service(pid: int, port: int, requests: list[bytes], seconds: float, out: Path) -> str:
    """py-spy samples of the server under concurrency-8 load: the hottest frames (own time, GIL held)."""
    try:
        spy = subprocess.Popen(
            [
                *("py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds))),
                # --gil: only the thread holding the GIL is sampled, i.e. Python work on the hot path,
                # not threads parked in a queue or waiting for the GIL.
                *("--format", "raw", "--output", str(out), "--rate", "200", "--gil"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        return "skipped: py-spy is not installed (pip install py-spy)"
    asyncio.run(closed_loop(port, requests, 8, seconds + 1))
    _, err = spy.communicate(timeout=60)
    if spy.returncode != 0 or not out.exists():
        return f"skipped: py-spy failed: {err.decode(errors='replace')[-500:]}"
    return summarise_profile(out)


def summarise_profile(raw: Path, top: int = 12) -> str:
    """Own-time share of the hottest functions in a py-spy raw (collapsed stacks) file."""
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        leaf = stack.split(";")[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
        total += int(count)
    lines = [
        f"{100 * n / total:5.1f}%  {frame}" for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> ServeReport:
    report = ServeReport()
    model = EmbeddingModel.load(args.bundle)
    m = model.manifest
    pngs = sample_pngs(model, 256, args.seed)
    tensors = np.stack([preprocess_pil(Image.open(io.BytesIO(b)), m.preprocessing, m.input) for b in pngs])
    while len(tensors) < max(args.concurrency):
        tensors = np.concatenate([tensors, tensors])
    del model
    report.load += raw_ort_rows(args.bundle, tensors, args.concurrency, args.seconds)

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.cold_starts):
            cold = start_service(args, Path(tmp) / f"cold{i}.sqlite3")
            assert cold.ready_s is not None
            report.cold_start_s.append(cold.ready_s)
            cold.stop()

        server = start_service(args, Path(tmp) / "bench.sqlite3")
        port = server.port
        try:
            requests = [embed_request([b]) for b in pngs]
            # Warm-up at the highest load level, so the reading below already includes full-size batches.
            asyncio.run(closed_loop(port, requests, max(args.concurrency), 2.0))
            report.rss_mib_after_warmup = rss_mib(server.pid)
            report.load += http_rows("idembed /v1/embed", port, requests, args.concurrency, args.seconds)
            if args.profile_seconds > 0:
                report.profile = profile_service(
                    server.pid, port, requests, args.profile_seconds, Path(tmp) / "profile.txt"
                )
            _, _, _, done = asyncio.run(
                closed_loop(port, requests, 8, args.memory_max_seconds, max_requests=args.memory_requests)
            )
            report.requests_for_memory = done
            report.rss_mib_after_requests = rss_mib(server.pid)
            report.rss_growth_pct = 100 * (report.rss_mib_after_requests / report.rss_mib_after_warmup - 1)
        finally:
            server.stop()

    report.triton = triton_rows(args, pngs, report)
    return report


def triton_rows(args: argparse.Namespace, pngs: list[bytes], report: ServeReport) -> str:
    note, rows = triton_load(
        args.triton_python, args.bundle, args.max_batch_size, pngs, args.concurrency, lambda c: args.seconds
    )
    report.load += rows
    return note


def triton_load(
    python: Path | str | None,
    bundle: Path,
    max_batch_size: int,
    pngs: list[bytes],
    levels: list[int],
    phase_s: Callable[[int], float],
    warmup: tuple[int, float] = (8, 2.0),
) -> tuple[str, list[LoadRow]]:
    """Triton (PyTriton) on `bundle`, warmed with `warmup` = (connections, seconds), then a closed loop at
    each of `levels` for `phase_s(level)` seconds: ("ok", rows), or (why it was skipped, [])."""
    if python is None:
        return "skipped: no --triton-python (a venv with nvidia-pytriton 0.7.0, see docs/performance.md)", []
    if not Path(python).is_file():
        return f"skipped: --triton-python {python} does not exist", []
    rows: list[LoadRow] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            triton = start_triton(Path(python), bundle, max_batch_size, Path(tmp) / "triton.log")
        except ServerStartError as exc:
            return f"skipped: Triton did not start: {str(exc)[-500:]}", []
        try:
            requests = [triton_request(b) for b in pngs]
            asyncio.run(closed_loop(triton.port, requests, *warmup))
            for c in levels:
                rows += http_rows("Triton (PyTriton) HTTP", triton.port, requests, [c], phase_s(c))
        finally:
            triton.stop()
    return "ok", rows


def print_report(r: ServeReport) -> None:
    print(f"{'target':26} {'conc':>4} {'img/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'err':>4}  note")
    for row in r.load:
        print(
            f"{row.target:26} {row.concurrency:>4} {row.images_per_s:>9.0f} {row.p50_ms:>8.2f} "
            f"{row.p99_ms:>8.2f} {row.errors:>4}  {row.note}"
        )
    by = {(row.target, row.concurrency): row.images_per_s for row in r.load}
    for c in sorted({row.concurrency for row in r.load}):
        svc = by.get(("idembed /v1/embed", c))
        ort = by.get(("onnxruntime in-process", c))
        tri = by.get(("Triton (PyTriton) HTTP", c))
        ratios = []
        if svc and ort:
            ratios.append(f"service/raw ORT {svc / ort:.2f}x")
        if svc and tri:
            ratios.append(f"service/Triton {svc / tri:.2f}x")
        print(f"  concurrency {c}: " + ", ".join(ratios))
    print(
        f"RSS after warm-up {r.rss_mib_after_warmup:.1f} MiB, after {r.requests_for_memory:,} requests "
        f"{r.rss_mib_after_requests:.1f} MiB ({r.rss_growth_pct:+.1f} %)"
    )
    cs = r.cold_start_s
    print(
        f"cold start to /readyz 200: median {np.median(cs):.2f} s over {len(cs)} "
        f"(min {min(cs):.2f}, max {max(cs):.2f})"
    )
    print(f"Triton: {r.triton}")
    if r.profile:
        print("hot path (py-spy --gil, own time, concurrency 8):\n" + r.profile)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    p.add_argument("--concurrency", type=int_list, default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=8.0, help="duration of each load phase")
    p.add_argument(
        "--memory-requests", type=int, default=20_000, help="requests before the second RSS reading"
    )
    p.add_argument("--memory-max-seconds", type=float, default=300.0, help="time bound of the memory phase")
    p.add_argument("--cold-starts", type=int, default=3)
    p.add_argument(
        "--max-batch-size", type=int, default=32, help="batch limit of both servers (Triton: dynamic batcher)"
    )
    add_server_env_argument(p, "IDEMBED_INFERENCE_WORKERS=2")
    p.add_argument("--profile-seconds", type=float, default=10.0, help="py-spy sampling time (0: no profile)")
    p.add_argument(
        "--triton-python",
        type=Path,
        default=os.environ.get("IDEMBED_TRITON_PYTHON"),
        help="python of a venv with nvidia-pytriton [env IDEMBED_TRITON_PYTHON]",
    )
    p.add_argument("--log-level", default="WARNING", help="server log level during the benchmark")
    p.add_argument("--seed", type=int, default=0)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not (args.bundle / "manifest.json").is_file():
        p.error(f"--bundle {args.bundle}: no manifest.json (train and export a bundle first)")
    if args.seconds <= 0 or args.cold_starts < 1 or args.memory_requests < 1:
        p.error("--seconds must be > 0, --cold-starts and --memory-requests >= 1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--json", type=Path, default=RESULTS / "serve.json")
    args = p.parse_args()
    check_args(p, args)
    report = run(args)
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(asdict(report), indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
