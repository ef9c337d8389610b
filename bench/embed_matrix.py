"""Several servers (checkout x bundle x settings) in interleaved rounds, 1- and 32-image closed loops, paired.

    python bench/embed_matrix.py --rounds 5 \\
        --server old-int8 bench/results/bundles/facecnn-112-rgb-int8-static --repo /path/to/old/checkout \\
        --server new-int8 bench/results/bundles/facecnn-112-rgb-int8-static \\
        --server new-fp32 bench/results/bundles/facecnn-112-rgb \\
        --pair new-int8/old-int8 --pair new-int8/new-fp32

    --server NAME BUNDLE [--repo CHECKOUT] [--env IDEMBED_X=V ...]  (--repo, --env: of the --server before)

Every server is started once and stays up (idle when not measured, as in bench/embed_ab.py). Each round runs,
for each server in turn (order reversed every other round), one closed loop of `--conc` connections per
request size in `--sizes` (embed_bench's client and random PNGs of the first bundle's input size). On a
shared host one round's ratios are what to quote: `--pair A/B` prints the median and every round of the
paired ratio A/B per request size. Writes bench/results/embed_matrix.json. ~5 s per server, size and round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import embed_bench as eb

from bundle.host import host_record
from service.model import EmbeddingModel


@dataclass
class Server:
    name: str
    bundle: Path
    repo: Path = eb.REPO
    env: dict[str, str] = field(default_factory=dict)


def parse_servers(argv: list[str]) -> tuple[list[Server], list[str]]:
    """Pull `--server NAME BUNDLE [--repo R] [--env K=V ...]` groups out of argv; returns (servers, rest)."""
    servers: list[Server] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--server":
            if len(argv) - i < 3:
                raise SystemExit("--server needs NAME BUNDLE")
            servers.append(Server(argv[i + 1], Path(argv[i + 2]).resolve()))
            i += 3
        elif arg in ("--repo", "--env") and servers:
            i += 1
            if arg == "--repo":
                servers[-1].repo = Path(argv[i]).resolve()
                i += 1
            else:
                while i < len(argv) and not argv[i].startswith("--"):
                    try:
                        name, value = eb.server_setting(argv[i])
                    except argparse.ArgumentTypeError as exc:
                        raise SystemExit(f"--env {exc}") from None
                    servers[-1].env[name] = value
                    i += 1
        else:
            rest.append(arg)
            i += 1
    names = [s.name for s in servers]
    if len(set(names)) != len(names):
        raise SystemExit(f"server names must differ: {names}")
    return servers, rest


def main() -> None:
    servers, rest = parse_servers(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="closed-loop phase per server, size and round")
    p.add_argument("--sizes", default="1,32", help="images per request, comma-separated")
    p.add_argument("--conc", type=int, default=32)
    p.add_argument("--log-level", default="INFO", help="server IDEMBED_LOG_LEVEL (INFO: access log on)")
    p.add_argument("--pair", action="append", default=[], metavar="A/B", help="print the paired ratio A/B")
    p.add_argument("--out", type=Path, default=eb.RESULTS / "embed_matrix.json")
    a = p.parse_args(rest)
    if not servers:
        p.error("give at least one --server NAME BUNDLE")
    sizes = [int(x) for x in a.sizes.split(",")]
    pairs = [tuple(x.split("/", 1)) for x in a.pair]
    known = {s.name for s in servers}
    for pair in pairs:
        if len(pair) != 2 or not set(pair) <= known:
            p.error(f"--pair {'/'.join(pair)}: expected A/B with A and B among {sorted(known)}")

    model = EmbeddingModel.load(servers[0].bundle)
    pngs = eb.sample_pngs(model, 64, 0)
    del model
    requests = {
        k: [eb.embed_request([pngs[(i + j) % len(pngs)] for j in range(k)]) for i in range(0, len(pngs), k)]
        for k in sizes
    }
    server_args = argparse.Namespace(
        max_batch_size=32, batch_wait_ms=0.0, log_level=a.log_level, inline_max_ms=0.5, server_env=[]
    )
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        s.name: {str(k): [] for k in sizes} for s in servers
    }
    with tempfile.TemporaryDirectory() as tmp:
        running = []
        try:
            for i, s in enumerate(servers):
                folder = Path(tmp) / str(i)
                folder.mkdir()
                port = eb.free_port()
                running.append((s, port, eb.start_server(server_args, s.bundle, port, folder, s.env, s.repo)))
            for r in range(a.rounds):
                for s, port, proc in running if r % 2 == 0 else running[::-1]:
                    for k in sizes:
                        phase = asyncio.run(
                            eb.http_throughput(port, proc.pid, requests[k], k, a.conc, a.seconds)
                        )
                        results[s.name][str(k)].append(
                            {
                                "images_per_s": phase.images_per_s,
                                "mean_batch_size": phase.mean_batch_size,
                                "server_cpu_cores": phase.server_cpu_cores,
                                "errors": phase.errors,
                            }
                        )
                        print(
                            f"round {r} {s.name} {k} img/request: {phase.images_per_s:,.0f} img/s, batch "
                            f"{phase.mean_batch_size:.1f}, server {phase.server_cpu_cores:.2f} cores",
                            flush=True,
                        )
        finally:
            for _, _, proc in running:
                proc.stop()

    med = statistics.median
    lines = ["| server | " + " | ".join(f"{k} img/request, img/s (range)" for k in sizes) + " |"]
    lines.append("| --- |" + " --- |" * len(sizes))
    for s in servers:
        cells = []
        for k in sizes:
            v = [x["images_per_s"] for x in results[s.name][str(k)]]
            cells.append(f"{med(v):,.0f} ({min(v):,.0f}-{max(v):,.0f})")
        lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
    paired = {}
    for num, den in pairs:
        for k in sizes:
            ratios = [
                x["images_per_s"] / y["images_per_s"]
                for x, y in zip(results[num][str(k)], results[den][str(k)], strict=True)
            ]
            paired[f"{num}/{den}@{k}"] = ratios
            lines.append(
                f"\n{num} / {den}, {k} img/request: paired median {med(ratios):.3f} "
                f"(rounds {', '.join(f'{x:.3f}' for x in ratios)})"
            )
    print("\n".join(lines))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "command": "python " + " ".join(sys.argv),
                "concurrency": a.conc,
                "seconds_per_phase": a.seconds,
                "host": host_record(),
                "servers": [
                    {"name": s.name, "bundle": str(s.bundle), "repo": str(s.repo), "env": s.env}
                    for s in servers
                ],
                "results": results,
                "paired": paired,
            },
            indent=1,
        )
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
