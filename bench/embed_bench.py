"""Embedding service speed: /v1/embed throughput at concurrency N vs raw onnxruntime batch throughput on the
same model, and single-request latency overhead over one onnxruntime call; all measured in one run.

    python bench/embed_bench.py --bundle models/default [--concurrency 32] [--seconds 10]

Prints a table and writes bench/results/embed_bench.json. The load generator is a minimal keep-alive HTTP/1.1
client on raw asyncio streams (not httpx): on a small machine the client shares the CPU with the server, and
a heavy client would be measured instead of the service.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from bundle.preprocess import preprocess_pil
from service.model import EmbeddingModel

REPO = Path(__file__).resolve().parents[1]


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


def ort_throughput(model: EmbeddingModel, batch: np.ndarray, seconds: float) -> float:
    """Images/s of back-to-back session.run calls on one ready batch."""
    for _ in range(5):
        model.run_raw(batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.run_raw(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def ort_latency(model: EmbeddingModel, one: np.ndarray, n: int) -> list[float]:
    for _ in range(20):
        model.run_raw(one)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        model.run_raw(one)
        times.append(time.perf_counter() - t)
    return times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, tmp: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMBED_")}
    env.update(
        {
            "IDEMBED_BUNDLE_PATH": str(args.bundle),
            "IDEMBED_PORT": str(port),
            "IDEMBED_HOST": "127.0.0.1",
            "IDEMBED_STORE_URL": f"sqlite:///{tmp / 'bench.sqlite3'}",
            "IDEMBED_MAX_BATCH_SIZE": str(args.max_batch_size),
            "IDEMBED_BATCH_WAIT_MS": str(args.batch_wait_ms),
            "IDEMBED_LOG_LEVEL": args.log_level,
            "IDEMBED_INLINE_INFERENCE_MAX_MS": str(args.inline_max_ms),
        }
    )
    # Logs go to a file: a pipe nobody reads would fill up and block the server mid-benchmark.
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli"], cwd=REPO, env=env, stdout=out, stderr=out
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                if b" 200 " in s.recv(200):
                    return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become ready in 60 s")


class Connection:
    """One keep-alive HTTP/1.1 connection sending prebuilt POST requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self.reader.readexactly(length)
        return status

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


async def http_throughput(
    port: int, requests: list[bytes], concurrency: int, seconds: float
) -> tuple[float, int]:
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
    counting, start = True, time.perf_counter()
    await asyncio.sleep(seconds)
    counting = False
    elapsed = time.perf_counter() - start
    stop.set()
    await asyncio.gather(*tasks)
    for c in conns:
        c.close()
    return done / elapsed, errors


def ms(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q) * 1000.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput phase")
    p.add_argument("--latency-requests", type=int, default=500)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--batch-wait-ms", type=float, default=0.0)
    p.add_argument(
        "--log-level", default="INFO", help="server log level (INFO writes one access line/request)"
    )
    p.add_argument("--inline-max-ms", type=float, default=0.5, help="server IDEMBED_INLINE_INFERENCE_MAX_MS")
    p.add_argument(
        "--images-per-request",
        type=int,
        default=1,
        help="images per throughput-phase request (1: worst case)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "embed_bench.json")
    args = p.parse_args()
    # SIGTERM (e.g. from `timeout`) must still run the `finally` that stops the server this script started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"--bundle {args.bundle}: no manifest.json (train and export a bundle first)")

    model = EmbeddingModel.load(args.bundle)
    pngs = sample_pngs(model, 256, args.seed)
    m = model.manifest
    tensors = np.stack([preprocess_pil(Image.open(io.BytesIO(b)), m.preprocessing, m.input) for b in pngs])
    batch = tensors[: args.concurrency]
    raw_tput = ort_throughput(model, batch, args.seconds)
    raw_lat = ort_latency(model, tensors[:1], args.latency_requests)
    del model  # free the session's threads before the server runs

    singles = [embed_request([b]) for b in pngs]
    k = args.images_per_request
    multi = [embed_request([pngs[(i + j) % len(pngs)] for j in range(k)]) for i in range(0, len(pngs), k)]
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_server(args, port, Path(tmp))
        try:
            http_lat = asyncio.run(http_latency(port, singles, args.latency_requests))
            req_tput, errors = asyncio.run(http_throughput(port, multi, args.concurrency, args.seconds))
        finally:
            server.terminate()
            server.wait(30)
    svc_tput = req_tput * k

    overhead_ms = statistics.median(http_lat) * 1000 - statistics.median(raw_lat) * 1000
    result = {
        "model_id": m.model_id,
        "input": [m.input.height, m.input.width, m.input.channels],
        "concurrency": args.concurrency,
        "images_per_request": k,
        "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "inline_inference_max_ms": args.inline_max_ms,
        "server_log_level": args.log_level,
        "raw_ort_batch_images_per_s": raw_tput,
        "service_images_per_s": svc_tput,
        "service_errors": errors,
        "throughput_ratio": svc_tput / raw_tput,
        "throughput_target": 0.85,
        "ort_single_call_p50_ms": ms(raw_lat, 0.5),
        "service_single_request_p50_ms": ms(http_lat, 0.5),
        "service_single_request_p95_ms": ms(http_lat, 0.95),
        "single_request_overhead_p50_ms": overhead_ms,
        "overhead_target_ms": 1.0,
        "cpu_count": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }
    rows = [
        (f"raw onnxruntime, batch of {args.concurrency}", f"{raw_tput:,.0f} img/s", ""),
        (
            f"service /v1/embed, concurrency {args.concurrency}, {k} img/req",
            f"{svc_tput:,.0f} img/s",
            f"{errors} err",
        ),
        ("throughput ratio (target >= 0.85)", f"{svc_tput / raw_tput:.2f}x", ""),
        ("one onnxruntime call (batch 1), p50", f"{ms(raw_lat, 0.5):.3f} ms", ""),
        ("one /v1/embed request, p50 / p95", f"{ms(http_lat, 0.5):.3f} ms", f"{ms(http_lat, 0.95):.3f} ms"),
        ("single-request overhead p50 (target <= 1 ms)", f"{overhead_ms:.3f} ms", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"embed benchmark: {m.model_id}, input {m.input.height}x{m.input.width}x{m.input.channels}")
    for name, value, extra in rows:
        print(f"  {name:<{width}}  {value:>14}  {extra}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
