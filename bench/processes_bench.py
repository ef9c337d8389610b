"""Scaling of `idembed-serve serve --processes N`: /v1/embed throughput with 1, 2, ... server processes.

    python bench/processes_bench.py --quick               # default + facecnn 112 RGB, 1 and 2 processes
    python bench/processes_bench.py --processes 1,2,4,8 --bundle models/default --seconds 10

Every bundle is served on a throwaway local PostgreSQL store (testkit.pg_local: `--processes` > 1 needs
a store the processes share) and driven by serve_bench's closed-loop keep-alive client (one base64 PNG per
request); with N processes each gets 1/N of the cores for onnxruntime (service/multiprocess.py). The client
runs on the same machine and takes CPU from the servers, so on a small host the ratios understate scaling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import serve_bench
from embed_bench import embed_request, sample_pngs
from identify_bench import int_list

from service.model import EmbeddingModel
from testkit.pg_local import local_postgres
from testkit.server import ServerProcess

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


@dataclass
class Row:
    bundle: str
    processes: int
    concurrency: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def measure(
    bundle: Path, processes: int, url: str, levels: list[int], seconds: float, tmp: Path
) -> list[Row]:
    model = EmbeddingModel.load(bundle)
    requests = [embed_request([b]) for b in sample_pngs(model, 64, 0)]
    del model
    env = {
        "IDEMBED_BUNDLE_PATH": str(bundle),
        "IDEMBED_STORE_URL": url,
        "IDEMBED_LOG_LEVEL": "WARNING",
        "IDEMBED_REQUIRE_KEY_FOR_READS": "false",
    }
    argv = [sys.executable, "-m", "service.cli", "serve", "--processes", str(processes)]
    rows = []
    with ServerProcess(env, tmp / f"{bundle.name}-{processes}.log", argv=argv) as server:
        # Every worker finishes its own start-up; load for a while first so all of them take requests.
        asyncio.run(serve_bench.closed_loop(server.port, requests, max(levels), 2.0))
        for c in levels:
            rps, lat, errors, _ = asyncio.run(serve_bench.closed_loop(server.port, requests, c, seconds))
            rows.append(
                Row(
                    bundle.name,
                    processes,
                    c,
                    rps,
                    serve_bench.pct_ms(lat, 50),
                    serve_bench.pct_ms(lat, 99),
                    errors,
                )
            )
    return rows


def table(rows: list[Row]) -> str:
    base = {(r.bundle, r.concurrency): r.images_per_s for r in rows if r.processes == 1}
    lines = [
        "| bundle | processes | concurrency | img/s | p50 ms | p99 ms | errors | vs 1 process |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        one = base.get((r.bundle, r.concurrency))
        vs = f"{r.images_per_s / one:.2f}x" if one else "-"
        lines.append(
            f"| {r.bundle} | {r.processes} | {r.concurrency} | {r.images_per_s:,.0f} | {r.p50_ms:.2f} "
            f"| {r.p99_ms:.2f} | {r.errors} | {vs} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, action="append", help="bundle(s) to serve (repeatable)")
    p.add_argument("--processes", type=int_list, default=[1, 2])
    p.add_argument("--concurrency", type=int_list, default=[8, 32])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--quick", action="store_true", help="2 s phases")
    p.add_argument("--json", type=Path, default=RESULTS / "processes.json")
    args = p.parse_args()
    bundles = args.bundle or [REPO / "models" / "default", RESULTS / "bundles" / "facecnn-112-rgb"]
    for b in bundles:
        if not (b / "manifest.json").is_file():
            p.error(
                f"--bundle {b}: no manifest.json (bench/face_bundle.py --color-mode RGB makes the face one)"
            )
    if any(n < 1 for n in args.processes):
        p.error("--processes: every count must be >= 1")
    seconds = 2.0 if args.quick else args.seconds
    print(f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()}", flush=True)
    rows: list[Row] = []
    for bundle in bundles:
        # A store per bundle: a store holds one embedding dimension.
        with local_postgres() as url, tempfile.TemporaryDirectory() as tmp:
            for n in args.processes:
                rows += measure(bundle, n, url, args.concurrency, seconds, Path(tmp))
                print(table(rows[-len(args.concurrency) :]), flush=True)
    print("\n" + table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
