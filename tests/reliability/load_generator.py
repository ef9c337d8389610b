"""Closed-loop HTTP load against a running idembed server: N concurrent clients for a fixed time.

Used by the load tests here, and runnable on its own against any server (a compose deployment included):

    python tests/reliability/load_generator.py --url http://127.0.0.1:8000 --concurrency 64 --duration 60

Each client sends its next request as soon as the previous one answers, so the server is saturated; the
result counts statuses, transport errors, 503s with and without Retry-After, and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
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

    @property
    def shed(self) -> int:
        return self.statuses.get(503, 0) - self.unexplained_503

    def summary(self) -> dict[str, float | int]:
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
        }


def sample_png(seed: int, side: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _is_shed(response: httpx.Response) -> bool:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    return code == "overloaded" and response.headers.get("retry-after", "").isdigit()


async def _client_loop(client: httpx.AsyncClient, body: dict, result: LoadResult, stop_at: float) -> None:
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        try:
            response = await client.post("/v1/embed", json=body)
        except httpx.TransportError:
            result.transport_errors += 1
            continue
        elapsed = time.perf_counter() - start
        result.statuses[response.status_code] += 1
        result.latencies_s.append(elapsed)
        if response.status_code == 200:
            result.ok_latencies.append(elapsed)
        elif response.status_code == 503 and not _is_shed(response):
            result.unexplained_503 += 1


async def run_load(
    url: str, *, concurrency: int, duration_s: float, images_per_request: int = 1, timeout_s: float = 30.0
) -> LoadResult:
    """Saturate `url` with `concurrency` clients for `duration_s`, each request embedding N PNGs."""
    images = [base64.b64encode(sample_png(i)).decode() for i in range(images_per_request)]
    body = {"images": images}
    result = LoadResult(concurrency, duration_s, images_per_request)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        # One request first: connection set-up and any lazy server work are not part of the measurement.
        (await client.post("/v1/embed", json=body)).raise_for_status()
        started = time.perf_counter()
        stop_at = started + duration_s
        await asyncio.gather(*(_client_loop(client, body, result, stop_at) for _ in range(concurrency)))
        result.duration_s = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--images-per-request", type=int, default=1, help="images in each /v1/embed call")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
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
