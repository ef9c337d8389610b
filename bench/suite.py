"""The performance suite in one command: identify at scale, PostgreSQL replicas, serving vs ORT and Triton.

    python bench/suite.py                                   # everything (1M graph build takes minutes once)
    python bench/suite.py --quick                           # 10k/100k, short load phases (~10 min)
    python bench/suite.py --triton-python .venv-triton/bin/python --memory-requests 100000
    python bench/suite.py --face-bundle bench/results/bundles/facecnn-112-l   # also serve a face-sized model
    python bench/suite.py --quick --skip identify,pg,serve   # only the per-model-size serving table

The `models` part (bench/model_sizes.py) is the per-model-size table: the 8x8 default model, facecnn,
MobileFaceNet and IResNet-50 at 112x112 RGB (`--models` picks), each /v1/embed at every concurrency against
raw onnxruntime on ready tensors, onnxruntime + in-process decode and (with --triton-python) Triton, plus
the single-request overhead.

Prints one table per part and writes bench/results/suite.json (plus the parts' own JSON files). Every figure
is measured in this run on this machine; the targets are checked as ratios of numbers from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import identify_bench
import model_sizes
import pg_bench
import serve_bench

from bundle.host import host_record

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, object]:
    return {
        **host_record(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def check_targets(result: dict[str, object]) -> list[str]:
    lines = []
    identify = [r for r in result.get("identify", []) if r["index"] == "hnsw"]  # type: ignore[union-attr]
    if identify:
        largest = max(r["enrolled"] for r in identify)
        best = [r for r in identify if r["enrolled"] == largest and r["recall_at_1"] >= 0.99]
        if best:
            fastest = min(best, key=lambda r: r["cpu_p50_ms"])
            wall_ok, cpu_ok = fastest["p50_ms"] <= 2.0, fastest["cpu_p50_ms"] <= 2.0
            lines.append(
                f"identify {largest:,}: p50 {fastest['p50_ms']:.3f} ms wall / "
                f"{fastest['cpu_p50_ms']:.3f} ms CPU at recall@1 {fastest['recall_at_1']:.3f} "
                f"({fastest['params']}) -> wall {'met' if wall_ok else 'MISSED'}, "
                f"CPU {'met' if cpu_ok else 'MISSED'} (p50 <= 2 ms, recall >= 0.99)"
            )
        else:
            top = max((r for r in identify if r["enrolled"] == largest), key=lambda r: r["recall_at_1"])
            lines.append(
                f"identify {largest:,}: best recall@1 {top['recall_at_1']:.3f} ({top['params']}) "
                "-> MISSED (>= 0.99)"
            )
    for serve in result.get("serve", []):  # type: ignore[union-attr]
        name = Path(serve["bundle"]).name
        by = {(r["target"], r["concurrency"]): r["images_per_s"] for r in serve["load"]}
        c = max(r["concurrency"] for r in serve["load"])
        svc, ort, tri = (
            by.get((t, c)) for t in ("idembed /v1/embed", "onnxruntime in-process", "Triton (PyTriton) HTTP")
        )
        if svc and ort:
            lines.append(
                f"[{name}] embed c={c}: service/raw ORT {svc / ort:.2f}x -> "
                f"{'met' if svc / ort >= 0.85 else 'MISSED'} (>= 0.85)"
            )
        if svc and tri:
            lines.append(
                f"[{name}] embed c={c}: service/Triton {svc / tri:.2f}x -> "
                f"{'met' if svc / tri >= 1.0 else 'MISSED'} (>= 1.0)"
            )
        growth = serve["rss_growth_pct"]
        lines.append(
            f"[{name}] memory: {growth:+.1f} % after {serve['requests_for_memory']:,} requests -> "
            f"{'met' if growth <= 5 else 'MISSED'} (<= 5 %)"
        )
        cold = sorted(serve["cold_start_s"])[len(serve["cold_start_s"]) // 2]
        lines.append(
            f"[{name}] cold start: median {cold:.2f} s -> {'met' if cold <= 2.0 else 'MISSED'} (<= 2 s)"
        )
    for run in result.get("models", []):  # type: ignore[union-attr]
        by = {(r["target"], r["concurrency"]): r["images_per_s"] for r in run["load"]}
        levels = sorted({r["concurrency"] for r in run["load"]})
        svc = {c: by.get(("idembed /v1/embed", c)) for c in levels}
        raw, tri = (
            by.get(("onnxruntime in-process", levels[-1])),
            by.get(("Triton (PyTriton) HTTP", levels[-1])),
        )
        top = svc[levels[-1]]
        if top and raw:
            lines.append(
                f"[{run['model']}] embed c={levels[-1]}: service/raw ORT {top / raw:.2f}x -> "
                f"{'met' if top / raw >= 0.9 else 'MISSED'} (>= 0.9)"
            )
        if tri:
            vs = [svc[c] / by[("Triton (PyTriton) HTTP", c)] for c in levels if svc[c]]
            lines.append(
                f"[{run['model']}] service/Triton {' / '.join(f'{v:.2f}x' for v in vs)} at "
                f"{' / '.join(map(str, levels))} -> {'met' if min(vs) >= 1.0 else 'MISSED'} (>= 1.0 at each)"
            )
        overhead = run["overhead_ms"]
        # Below zero the machine load moved between the paired samples: no verdict from such a run.
        verdict = "met" if 0 <= overhead <= 1 else "MISSED" if overhead > 1 else "NOT MEASURED (load moved)"
        lines.append(f"[{run['model']}] single-request overhead {overhead:.2f} ms -> {verdict} (<= 1 ms)")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_bench.add_arguments(p)
    p.add_argument(
        "--quick", action="store_true", help="10k/100k only, 3 s load phases, 2,000 memory requests"
    )
    p.add_argument("--sizes", default="10000,100000,1000000", help="identify gallery sizes")
    p.add_argument("--expansion-search", default="64,256,1024,2048", help="HNSW ef values to sweep")
    p.add_argument(
        "--retry-below",
        default="0.5",
        help="cosine below which a weak HNSW match is searched again with a wide beam ('' skips those rows)",
    )
    p.add_argument("--pg-size", type=int, default=100_000, help="gallery size for the PostgreSQL comparison")
    p.add_argument(
        "--face-bundle",
        type=Path,
        help="also serve this (face-sized) bundle, with one inference worker per core "
        "(e.g. bench/results/bundles/facecnn-112-l, made by bench/face_bundle.py)",
    )
    model_sizes.add_arguments(p)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: identify, pg, serve, models")
    p.add_argument("--json", type=Path, default=RESULTS / "suite.json")
    args = p.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    parts = {"identify", "pg", "serve", "models"}
    if skip - parts:
        p.error(f"--skip: unknown part(s) {', '.join(sorted(skip - parts))}")
    models = model_sizes.check_models(p, args) if "models" not in skip else []
    if args.quick:
        args.sizes, args.pg_size = "10000,100000", 20_000
        args.seconds, args.memory_requests, args.profile_seconds = 3.0, 2_000, 5.0
    if "serve" not in skip or models:
        serve_bench.check_args(p, args)
        if args.face_bundle is not None and not (args.face_bundle / "manifest.json").is_file():
            p.error(f"--face-bundle {args.face_bundle}: no manifest.json (make it with bench/face_bundle.py)")

    result: dict[str, object] = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if "identify" not in skip:
        print("== identify: single-query latency and recall@1 vs exact ==", flush=True)
        id_argv = [
            "--sizes",
            args.sizes,
            "--expansion-search",
            args.expansion_search,
            "--seed",
            str(args.seed),
        ]
        if args.retry_below:
            id_argv += ["--retry-below", args.retry_below]
        id_args = identify_bench.parse_args(id_argv)
        rows = identify_bench.run(id_args)
        result["identify"] = [asdict(r) for r in rows]
    if "pg" not in skip:
        print("== PostgreSQL: pgvector HNSW over SQL vs local index synced from the store ==", flush=True)
        pg_rows = pg_bench.run(args.pg_size, 128, 500, [100, 256], args.seed)
        pg_bench.print_rows(pg_rows)
        result["pg"] = [asdict(r) for r in pg_rows]
    if "serve" not in skip:
        print("\n== serving: /v1/embed vs raw onnxruntime vs Triton ==", flush=True)
        runs = [(args.bundle, list(args.server_env))]
        if args.face_bundle is not None:
            workers = ("IDEMBED_INFERENCE_WORKERS", str(len(os.sched_getaffinity(0))))
            runs.append((args.face_bundle, [*args.server_env, workers]))
        result["serve"] = []
        for bundle, server_env in runs:
            print(f"-- {bundle} {' '.join(f'{k}={v}' for k, v in server_env)}", flush=True)
            report = serve_bench.run(
                argparse.Namespace(**{**vars(args), "bundle": bundle, "server_env": server_env})
            )
            serve_bench.print_report(report)
            settings = dict(server_env)
            result["serve"].append({"bundle": str(bundle), "server_env": settings, **asdict(report)})
    if models:
        print("\n== serving per model size: /v1/embed vs raw ORT, ORT + decode and Triton ==", flush=True)
        runs = model_sizes.run_all(models, args)
        result["models"] = [asdict(r) for r in runs]
        result["models_table"] = model_sizes.table(runs)
        print("\n" + result["models_table"])
    result["machine"]["load_average_at_end"] = os.getloadavg()  # type: ignore[index]
    result["targets"] = check_targets(result)
    print("\n== targets ==")
    for line in result["targets"]:  # type: ignore[union-attr]
        print("  " + line)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
