"""Embedding service speed: /v1/embed throughput at concurrency N vs raw onnxruntime batch throughput on the
same model, and single-request latency overhead over one onnxruntime call; all measured in one run per bundle.

    python bench/embed_bench.py --wrk          # models/default + a 112x112 gray facecnn bundle
    python bench/embed_bench.py --bundle models/default --no-face --images-per-request 1 32

For each bundle, one run: raw onnxruntime on a ready batch of `--concurrency` images, before and after the
service phases, with onnxruntime's default session options and with intra-op spinning off (the faster
configuration's mean is the baseline; before/after shows drift from other jobs on a shared host); one
onnxruntime call on one image; then the service started on a free port: one sequential `/v1/embed` request
at a time (one PNG), and `/v1/embed` with `--concurrency` keep-alive connections for each
`--images-per-request` value (and, with `--wrk`, 1 image/request driven by wrk). Unless `--no-face`, a
`--face-size` face-sized bundle is built with bench/face_bundle.py under bench/results/ if missing (untrained
`facecnn`: speed does not depend on the weights) and benchmarked too.

Prints a markdown table and writes bench/results/embed_bench.json. The load generator is a minimal keep-alive
HTTP/1.1 client on raw asyncio streams (not httpx) in this process, separate from the server process: on a
small machine the client shares the CPU with the server, so its CPU time during each throughput phase is
measured and reported (`client_cpu_cores`) beside the server's, to show it is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from bundle.host import host_record
from bundle.preprocess import preprocess_pil
from service.model import EmbeddingModel, RuntimeOptions
from testkit import ort_timing
from testkit.server import ServerProcess, ServerStartError, free_port, process_cpu_s

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
THROUGHPUT_TARGET = 0.85
OVERHEAD_TARGET_MS = 1.0


def sample_pngs(model: EmbeddingModel, count: int, seed: int) -> list[bytes]:
    """Random PNGs of the model's input size and colour mode (pixel content does not affect timing)."""
    spec, pre = model.manifest.input, model.manifest.preprocessing
    rng = np.random.default_rng(seed)
    shape = (spec.height, spec.width) if pre.color_mode == "L" else (spec.height, spec.width, 3)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def ort_throughput(model: EmbeddingModel, batch: np.ndarray, seconds: float, callers: int = 1) -> float:
    """Images/s of back-to-back session.run calls on `batch`, split among `callers` threads: the same number
    of images in flight as one call on the whole batch, as the service has at that concurrency."""
    return ort_timing.throughput(model.run_raw, batch, seconds, callers)


def ort_latency(model: EmbeddingModel, one: np.ndarray, n: int) -> list[float]:
    """Seconds of each of `n` sequential session.run calls on one image."""
    return ort_timing.sequential_latency(model.run_raw, one, n)


def server_setting(item: str) -> tuple[str, str]:
    """argparse type of `--server-env`: `IDEMBED_NAME=VALUE` -> (name, value)."""
    name, sep, value = item.partition("=")
    if not sep or not name.startswith("IDEMBED_"):
        raise argparse.ArgumentTypeError(f"{item!r}: expected IDEMBED_NAME=VALUE")
    return name, value


def add_server_env_argument(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument(
        "--server-env",
        type=server_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"extra service setting, e.g. {example} (repeatable)",
    )


def start_server(
    args: argparse.Namespace,
    bundle: Path,
    port: int,
    tmp: Path,
    settings: dict[str, str] | None = None,
    repo: Path = REPO,
) -> ServerProcess:
    """`python -m service.cli` of checkout `repo` on `bundle`, logging to a file in `tmp`; returns once
    /readyz answers 200."""
    env = {
        "IDEMBED_BUNDLE_PATH": str(bundle),
        "IDEMBED_STORE_URL": f"sqlite:///{tmp / 'bench.sqlite3'}",
        "IDEMBED_MAX_BATCH_SIZE": str(args.max_batch_size),
        "IDEMBED_BATCH_WAIT_MS": str(args.batch_wait_ms),
        "IDEMBED_LOG_LEVEL": args.log_level,
        "IDEMBED_INLINE_INFERENCE_MAX_MS": str(args.inline_max_ms),
        # Reads are open: the load generator sends no key (the service's default requires one).
        "IDEMBED_REQUIRE_KEY_FOR_READS": "false",
        **(settings or {}),
        **dict(args.server_env),
    }
    try:
        return ServerProcess(env, tmp / "server.log", port=port, cwd=repo).start(timeout_s=60)
    except ServerStartError as exc:
        raise SystemExit(str(exc)) from None


class Connection:
    """One keep-alive HTTP/1.1 connection sending prebuilt requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, raw: bytes) -> int:
        status, _ = await self.exchange(raw)
        return status

    async def exchange(self, raw: bytes) -> tuple[int, bytes]:
        """Send one request, read the response; returns (status, body)."""
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def embed_request(pngs: list[bytes]) -> bytes:
    body = json.dumps({"images": [base64.b64encode(p).decode() for p in pngs]}).encode()
    head = (
        f"POST /v1/embed HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def http_latency(port: int, requests: list[bytes], n: int) -> list[float]:
    """Seconds of each of `n` sequential requests on one keep-alive connection."""
    conn = await Connection.open(port)
    for raw in requests[:20]:
        await conn.request(raw)
    times = []
    for i in range(n):
        t = time.perf_counter()
        status = await conn.request(requests[i % len(requests)])
        times.append(time.perf_counter() - t)
        if status != 200:
            raise SystemExit(f"/v1/embed answered {status}")
    conn.close()
    return times


async def batch_stats(port: int) -> tuple[float, float]:
    """(images, onnxruntime calls) so far, from the server's `idembed_batch_size` histogram."""
    conn = await Connection.open(port)
    status, body = await conn.exchange(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
    conn.close()
    if status != 200:
        raise SystemExit(f"/metrics answered {status}")
    text = body.decode()
    total = re.search(r"^idembed_batch_size_sum (\S+)$", text, re.M)
    calls = re.search(r"^idembed_batch_size_count (\S+)$", text, re.M)
    if total is None or calls is None:
        raise SystemExit("/metrics has no idembed_batch_size histogram")
    return float(total.group(1)), float(calls.group(1))


@dataclass
class LoadPhase:
    """One closed-loop throughput phase against the service."""

    images_per_request: int
    requests_per_s: float
    images_per_s: float
    errors: int
    mean_batch_size: float
    client_cpu_cores: float
    server_cpu_cores: float


async def http_throughput(
    port: int, server_pid: int, requests: list[bytes], images: int, concurrency: int, seconds: float
) -> LoadPhase:
    """Closed loop: `concurrency` connections each send the next request as soon as the last is answered."""
    conns = [await Connection.open(port) for _ in range(concurrency)]
    errors = 0
    counting = False
    done = 0

    async def worker(k: int, conn: Connection) -> None:
        nonlocal done, errors
        i = k
        while not stop.is_set():
            status = await conn.request(requests[i % len(requests)])
            i += concurrency
            if counting:
                done += 1
                errors += status != 200

    stop = asyncio.Event()
    tasks = [asyncio.create_task(worker(k, c)) for k, c in enumerate(conns)]
    await asyncio.sleep(min(2.0, seconds / 4))  # warm-up: connections open, batches at steady size
    images0, calls0 = await batch_stats(port)
    client0, server0 = time.process_time(), process_cpu_s(server_pid)
    counting, start = True, time.perf_counter()
    await asyncio.sleep(seconds)
    counting = False
    elapsed = time.perf_counter() - start
    client_cpu, server_cpu = time.process_time() - client0, process_cpu_s(server_pid) - server0
    images1, calls1 = await batch_stats(port)
    stop.set()
    await asyncio.gather(*tasks)
    for c in conns:
        c.close()
    return LoadPhase(
        images_per_request=images,
        requests_per_s=done / elapsed,
        images_per_s=done * images / elapsed,
        errors=errors,
        mean_batch_size=(images1 - images0) / max(calls1 - calls0, 1.0),
        client_cpu_cores=client_cpu / elapsed,
        server_cpu_cores=server_cpu / elapsed,
    )


def wrk_throughput(
    port: int, server_pid: int, body_file: Path, concurrency: int, seconds: float
) -> LoadPhase:
    """The same closed loop driven by `wrk` (C, one thread): a cross-check that the Python client is not
    the bottleneck. Every request carries the same one-image body (bench/wrk_embed.lua)."""
    images0, calls0 = asyncio.run(batch_stats(port))
    server0 = process_cpu_s(server_pid)
    children0 = os.times()
    start = time.perf_counter()
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds:g}s",
            "-s",
            str(REPO / "bench" / "wrk_embed.lua"),
            f"http://127.0.0.1:{port}/v1/embed",
        ],
        env={**os.environ, "EMBED_BODY": str(body_file)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    elapsed = time.perf_counter() - start
    children1 = os.times()
    server_cpu = process_cpu_s(server_pid) - server0
    images1, calls1 = asyncio.run(batch_stats(port))
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if rate is None:
        raise SystemExit(f"cannot read wrk output:\n{out}")
    client_cpu = (children1.children_user + children1.children_system) - (
        children0.children_user + children0.children_system
    )
    return LoadPhase(
        images_per_request=1,
        requests_per_s=float(rate.group(1)),
        images_per_s=float(rate.group(1)),
        errors=int(bad.group(1)) if bad else 0,
        mean_batch_size=(images1 - images0) / max(calls1 - calls0, 1.0),
        client_cpu_cores=client_cpu / elapsed,
        server_cpu_cores=server_cpu / elapsed,
    )


def ms(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q) * 1000.0)


# Raw onnxruntime is timed in three configurations and the fastest is the baseline, so no setting that helps
# the service can make the baseline look worse than onnxruntime manages on this host: its default session
# options; intra-op spinning off (the service's default, IDEMBED_ORT_ALLOW_SPINNING=false); and one
# single-threaded session.run caller per core (what IDEMBED_INFERENCE_WORKERS=<cores> does in the service).
CORES = len(os.sched_getaffinity(0))
RAW_CONFIGS: dict[str, tuple[RuntimeOptions, int]] = {
    "ort_default": (RuntimeOptions(), 1),
    "no_spinning": (RuntimeOptions(allow_spinning=False), 1),
    "one_thread_per_core": (RuntimeOptions(intra_op_threads=1, allow_spinning=False), CORES),
}


@dataclass
class RawPhase:
    """Raw onnxruntime on ready tensors, one session configuration."""

    images_per_s: float
    cpu_cores: float
    single_call_p50_ms: float


def raw_phase(
    bundle: Path, config: tuple[RuntimeOptions, int], batch: np.ndarray, seconds: float, n: int
) -> RawPhase:
    options, callers = config
    model = EmbeddingModel.load(bundle, options)
    cpu0, start = time.process_time(), time.perf_counter()
    images_per_s = ort_throughput(model, batch, seconds, callers)
    cores = (time.process_time() - cpu0) / (time.perf_counter() - start)
    p50 = ms(ort_latency(model, batch[:1], n), 0.5)
    del model  # free the session's threads before anything else runs
    return RawPhase(images_per_s, cores, p50)


def bench_bundle(args: argparse.Namespace, bundle: Path) -> dict[str, Any]:
    """Every measurement for one bundle, in one run: raw onnxruntime, then the service, then raw again."""
    model = EmbeddingModel.load(bundle)
    pngs = sample_pngs(model, 256, args.seed)
    m = model.manifest
    del model
    tensors = np.stack([preprocess_pil(Image.open(io.BytesIO(b)), m.preprocessing, m.input) for b in pngs])
    batch = np.ascontiguousarray(tensors[: args.concurrency])
    raw: dict[str, list[RawPhase]] = {name: [] for name in RAW_CONFIGS}

    def measure_raw() -> None:
        for name, config in RAW_CONFIGS.items():
            raw[name].append(raw_phase(bundle, config, batch, args.raw_seconds, args.latency_requests))

    measure_raw()
    singles = [embed_request([b]) for b in pngs]
    servers = [serve_phases(args, bundle, pngs, singles, workers) for workers in args.inference_workers]
    measure_raw()

    means = {name: statistics.fmean(r.images_per_s for r in runs) for name, runs in raw.items()}
    best = max(means, key=means.__getitem__)
    raw_tput = means[best]
    raw_cores = statistics.fmean(r.cpu_cores for r in raw[best])
    # The smallest single-call p50 of any configuration: the overhead is never flattered by a slow baseline.
    ort_p50 = min(r.single_call_p50_ms for runs in raw.values() for r in runs)

    def ratios(p: LoadPhase) -> dict[str, Any]:
        return {
            **asdict(p),
            "throughput_ratio": p.images_per_s / raw_tput,
            "throughput_target": THROUGHPUT_TARGET,
            # Images per CPU-second, service process vs raw onnxruntime: what the ratio would be if both got
            # the same CPU time (on a shared host they do not).
            "cpu_normalised_ratio": (p.images_per_s / max(p.server_cpu_cores, 1e-9))
            / (raw_tput / max(raw_cores, 1e-9)),
        }

    return {
        "bundle": str(
            bundle.resolve().relative_to(REPO) if bundle.resolve().is_relative_to(REPO) else bundle
        ),
        "model_id": m.model_id,
        "backbone": m.training.backbone,
        "input": [m.input.height, m.input.width, m.input.channels],
        "raw_ort_batch": args.concurrency,
        "raw_ort": {name: [asdict(r) for r in runs] for name, runs in raw.items()},
        "raw_ort_baseline_config": best,
        "raw_ort_images_per_s": raw_tput,
        "raw_ort_cpu_cores": raw_cores,
        "raw_ort_ms_per_image": 1000.0 / raw_tput,
        "ort_single_call_p50_ms": ort_p50,
        "overhead_target_ms": OVERHEAD_TARGET_MS,
        "servers": [
            {
                "inference_workers": srv.workers,
                "service": [ratios(p) for p in srv.phases],
                "wrk_1_image_per_request": None if srv.wrk is None else ratios(srv.wrk),
                "service_single_request_p50_ms": ms(srv.latencies, 0.5),
                "service_single_request_p95_ms": ms(srv.latencies, 0.95),
                "single_request_overhead_p50_ms": ms(srv.latencies, 0.5) - ort_p50,
            }
            for srv in servers
        ],
    }


@dataclass
class ServerRun:
    """The service phases against one server configuration."""

    workers: int
    latencies: list[float]
    phases: list[LoadPhase]
    wrk: LoadPhase | None


def serve_phases(
    args: argparse.Namespace, bundle: Path, pngs: list[bytes], singles: list[bytes], workers: int
) -> ServerRun:
    """Start the service with `workers` inference workers; sequential latency, then each throughput phase."""
    phases: list[LoadPhase] = []
    wrk_phase: LoadPhase | None = None
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_server(args, bundle, port, Path(tmp), {"IDEMBED_INFERENCE_WORKERS": str(workers)})
        try:
            http_lat = asyncio.run(http_latency(port, singles, args.latency_requests))
            for k in args.images_per_request:
                reqs = [
                    embed_request([pngs[(i + j) % len(pngs)] for j in range(k)])
                    for i in range(0, len(pngs), k)
                ]
                phases.append(
                    asyncio.run(http_throughput(port, server.pid, reqs, k, args.concurrency, args.seconds))
                )
            if args.wrk:
                body_file = Path(tmp) / "embed_body.json"
                body_file.write_bytes(singles[0].split(b"\r\n\r\n", 1)[1])
                wrk_phase = wrk_throughput(port, server.pid, body_file, args.concurrency, args.seconds)
        finally:
            server.stop()
    return ServerRun(workers, http_lat, phases, wrk_phase)


def face_bundle(size: int, color_mode: str) -> Path:
    """The face-sized benchmark bundle, built by bench/face_bundle.py in its own process if missing."""
    path = RESULTS / "bundles" / f"facecnn-{size}-{color_mode.lower()}"
    if not (path / "manifest.json").is_file():
        print(f"building {path.relative_to(REPO)} (untrained facecnn, TensorFlow export) ...", flush=True)
        script = REPO / "bench" / "face_bundle.py"
        cmd = [
            sys.executable,
            str(script),
            "--size",
            str(size),
            "--color-mode",
            color_mode,
            "--out",
            str(path),
        ]
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return path


def table(runs: list[dict[str, Any]], concurrency: int) -> str:
    """Markdown table: one row per bundle, server configuration and images-per-request (CPU in cores)."""
    c = concurrency
    head = (
        f"| model (input) | raw ORT, batch {c} | workers | img/req | service, conc. {c} | ratio (>= 0.85) "
        "| per-CPU ratio | mean batch | CPU: ORT / server / client | ORT 1 call p50 | service p50 "
        "| overhead p50 (<= 1 ms) |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for run in runs:
        h, w, ch = run["input"]
        for si, srv in enumerate(run["servers"]):
            rows = [(str(p["images_per_request"]), p) for p in srv["service"]]
            if srv["wrk_1_image_per_request"] is not None:
                rows.append(("1 (wrk)", srv["wrk_1_image_per_request"]))
            for i, (label, p) in enumerate(rows):
                first, top = i == 0, i == 0 and si == 0
                raw = f"{run['raw_ort_images_per_s']:,.0f} img/s ({run['raw_ort_ms_per_image']:.2f} ms/img)"
                cpu = f"{run['raw_ort_cpu_cores']:.2f} / {p['server_cpu_cores']:.2f} / "
                cpu += f"{p['client_cpu_cores']:.2f}"
                cells = [
                    f"{run['backbone']} ({h}x{w}x{ch})" if top else "",
                    raw if top else "",
                    str(srv["inference_workers"]) if first else "",
                    label,
                    f"{p['images_per_s']:,.0f} img/s" + (f" ({p['errors']} err)" if p["errors"] else ""),
                    f"**{p['throughput_ratio']:.2f}x**",
                    f"{p['cpu_normalised_ratio']:.2f}x",
                    f"{p['mean_batch_size']:.1f}",
                    cpu,
                    f"{run['ort_single_call_p50_ms']:.3f} ms" if top else "",
                    f"{srv['service_single_request_p50_ms']:.3f} ms" if first else "",
                    f"**{srv['single_request_overhead_p50_ms']:.3f} ms**" if first else "",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--bundle",
        type=Path,
        action="append",
        help="bundle folder; repeat for several (default: models/default)",
    )
    p.add_argument("--face-size", type=int, default=112, help="also bench a SIZExSIZE facecnn bundle")
    p.add_argument("--face-color-mode", choices=["L", "RGB"], default="L")
    p.add_argument("--no-face", action="store_true", help="bench only the --bundle folders")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput phase")
    p.add_argument(
        "--raw-seconds", type=float, default=5.0, help="duration of each raw onnxruntime phase (4 per bundle)"
    )
    p.add_argument("--latency-requests", type=int, default=500)
    p.add_argument("--max-batch-size", type=int, default=32, help="server IDEMBED_MAX_BATCH_SIZE")
    p.add_argument("--batch-wait-ms", type=float, default=0.0)
    p.add_argument(
        "--log-level", default="INFO", help="server log level (INFO writes one access line/request)"
    )
    p.add_argument("--inline-max-ms", type=float, default=0.5, help="server IDEMBED_INLINE_INFERENCE_MAX_MS")
    p.add_argument(
        "--images-per-request",
        type=int,
        nargs="+",
        default=[1, 32],
        help="images per throughput-phase request; one phase per value (1: worst case)",
    )
    p.add_argument(
        "--inference-workers",
        type=int,
        nargs="+",
        default=[1, CORES],
        help="IDEMBED_INFERENCE_WORKERS of each server configuration to bench (default: 1 and one per core)",
    )
    add_server_env_argument(p, "IDEMBED_ORT_ALLOW_SPINNING=true")
    p.add_argument(
        "--wrk", action="store_true", help="also drive 1 image/request with wrk (must be on PATH) as a check"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "embed_bench.json")
    args = p.parse_args()
    # SIGTERM (e.g. from `timeout`) must still run the `finally` that stops the server this script started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bundles = list(args.bundle or [REPO / "models" / "default"])
    for bundle in bundles:
        if not (bundle / "manifest.json").is_file():
            raise SystemExit(f"--bundle {bundle}: no manifest.json (train and export a bundle first)")
    if not args.no_face:
        bundles.append(face_bundle(args.face_size, args.face_color_mode))

    runs = []
    for bundle in bundles:
        print(f"benchmarking {bundle} ...", flush=True)
        runs.append(bench_bundle(args, bundle))
    load = os.getloadavg()
    result = {
        "command": " ".join(["python", "bench/embed_bench.py", *sys.argv[1:]]),
        "concurrency": args.concurrency,
        "seconds_per_phase": args.seconds,
        "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "inline_inference_max_ms": args.inline_max_ms,
        "server_log_level": args.log_level,
        "runs": runs,
        "load_average_at_end": [round(x, 2) for x in load],
        "cpu_count": os.cpu_count(),
        "host": host_record(),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }
    print()
    print(table(runs, args.concurrency))
    print(f"\nload average at end: {load[0]:.1f} on {os.cpu_count()} CPUs; client/server CPU in cores")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
