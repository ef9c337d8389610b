"""Closed-loop HTTP load against a running idembed server: N concurrent clients for a fixed time.

Used by the load tests here, and runnable on its own against any server (a compose deployment included):

    python -m testkit.load_generator --url http://127.0.0.1:8000 --concurrency 64 --duration 60

Each client sends its next request as soon as the previous one answers, so the server is saturated; the
result counts statuses, transport errors, 503s with and without Retry-After, and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    images_per_request: int
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: int = 0
    # 503s missing Retry-After or the `overloaded` error code: not load shedding but a failure.
    unexplained_503: int = 0
    latencies_s: list[float] = field(default_factory=list)
    ok_latencies: list[float] = field(default_factory=list)
    ok_finished_s: list[float] = field(default_factory=list)  # when each 200 arrived, from the start

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + self.transport_errors

    @property
    def errors(self) -> int:
        """Anything but a 200 or a well-formed shed (503 `overloaded` with Retry-After)."""
        return self.requests - self.statuses.get(200, 0) - self.shed

    def percentile_ms(self, q: float, *, ok_only: bool = True) -> float:
        values = self.ok_latencies if ok_only else self.latencies_s
        return float(np.percentile(values, q) * 1000) if values else float("nan")

    def window_p99_ms(self, windows: int = 3) -> list[float]:
        """p99 of the 200s in consecutive equal time windows: growth across them means unbounded queueing."""
        finished = np.asarray(self.ok_finished_s)
        latencies = np.asarray(self.ok_latencies)
        edges = np.linspace(0.0, self.duration_s, windows + 1)
        out = []
        for lo, hi in itertools.pairwise(edges):
            chosen = latencies[(finished >= lo) & (finished < hi)]
            out.append(float(np.percentile(chosen, 99) * 1000) if chosen.size else float("nan"))
        return out

    @property
    def fair_share_latency_ms(self) -> float:
        """Mean latency a fair FIFO server has at this throughput (Little's law: clients / throughput)."""
        return self.concurrency / (self.requests / self.duration_s) * 1000 if self.requests else float("nan")

    @property
    def shed(self) -> int:
        return self.statuses.get(503, 0) - self.unexplained_503

    def summary(self) -> dict[str, float | int | list[float]]:
        return {
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 2),
            "images_per_request": self.images_per_request,
            "requests": self.requests,
            "ok": self.statuses.get(200, 0),
            "shed_503_with_retry_after": self.shed,
            "errors": self.errors,
            "transport_errors": self.transport_errors,
            "throughput_rps": round(self.requests / self.duration_s, 1),
            "p50_ms": round(self.percentile_ms(50), 2),
            "p99_ms": round(self.percentile_ms(99), 2),
            "max_ms": round(max(self.ok_latencies, default=float("nan")) * 1000, 2),
            "p99_all_ms": round(self.percentile_ms(99, ok_only=False), 2),
            "fair_share_latency_ms": round(self.fair_share_latency_ms, 2),
            "p99_by_third_ms": [round(v, 1) for v in self.window_p99_ms(3)],
        }


def sample_png(seed: int, side: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _is_shed(status: int, headers: Mapping[str, str], body: bytes) -> bool:
    if status != 503:
        return False
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    return code == "overloaded" and headers.get("Retry-After", "").isdigit()


async def _client_loop(
    session: aiohttp.ClientSession, payload: bytes, result: LoadResult, started: float, stop_at: float
) -> None:
    headers = {"Content-Type": "application/json"}
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        try:
            async with session.post("/v1/embed", data=payload, headers=headers) as response:
                body = await response.read()
                status = response.status
                shed = _is_shed(status, response.headers, body)
        except (aiohttp.ClientError, TimeoutError):
            result.transport_errors += 1
            continue
        elapsed = time.perf_counter() - start
        result.statuses[status] += 1
        result.latencies_s.append(elapsed)
        if status == 200:
            result.ok_latencies.append(elapsed)
            result.ok_finished_s.append(time.perf_counter() - started)
        elif status == 503 and not shed:
            result.unexplained_503 += 1


async def run_load(
    url: str,
    *,
    concurrency: int,
    duration_s: float,
    images_per_request: int = 1,
    timeout_s: float = 30.0,
    api_key: str | None = None,
) -> LoadResult:
    """Saturate `url` with `concurrency` clients for `duration_s`, each request embedding N PNGs.

    aiohttp, not httpx: on two shared cores httpx's connection pool capped the measured throughput at a
    seventh of what the server sustained at 64 connections, so the figures described the client.
    """
    images = [base64.b64encode(sample_png(i)).decode() for i in range(images_per_request)]
    payload = json.dumps({"images": images}).encode()
    result = LoadResult(concurrency, duration_s, images_per_request)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    auth = {"X-API-Key": api_key} if api_key else None  # reads need a key unless the server opened them
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout, headers=auth) as session:
        # One request first: connection set-up and any lazy server work are not part of the measurement.
        headers = {"Content-Type": "application/json"}
        async with session.post("/v1/embed", data=payload, headers=headers) as response:
            response.raise_for_status()
        started = time.perf_counter()
        stop_at = started + duration_s
        await asyncio.gather(
            *(_client_loop(session, payload, result, started, stop_at) for _ in range(concurrency))
        )
        result.duration_s = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--images-per-request", type=int, default=1, help="images in each /v1/embed call")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    parser.add_argument(
        "--api-key", help="X-API-Key with the read scope (the service requires one by default)"
    )
    args = parser.parse_args(argv)
    for name in ("concurrency", "duration", "images_per_request"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    result = asyncio.run(
        run_load(
            args.url,
            concurrency=args.concurrency,
            duration_s=args.duration,
            images_per_request=args.images_per_request,
            api_key=args.api_key,
        )
    )
    summary = result.summary()
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**summary, "statuses": dict(result.statuses)}, indent=2) + "\n")
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
