"""Identify benchmark: single-query latency, recall@1 vs exact, build time and memory of the gallery indexes.

Synthetic clustered gallery (seeded): identities are unit vectors scattered around 1 cluster center per
1,000 identities (cosine ~0.5 to their center, ~0.25 to each other inside a cluster), and each query is a
fresh noisy view of one enrolled identity (cosine ~0.7 to it), like a second photo of that person. Isotropic
128-d clusters are a hard case for graph indexes (every identity in a cluster is about equally far from the
query except the one it belongs to), so the recall here is a conservative figure.

Latency is measured as the service searches: one query at a time through `VectorIndex.search(q, k)`.

    python bench/identify_bench.py                          # 10k, 100k, 1M (1M builds for minutes)
    python bench/identify_bench.py --sizes 10000,100000 --expansion-search 64,128,256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.gallery.ann import (  # noqa: E402
    DEFAULT_CONNECTIVITY,
    DEFAULT_DTYPE,
    DEFAULT_EXPANSION_ADD,
    DEFAULT_EXPANSION_SEARCH,
    DEFAULT_RETRY_EXPANSION,
    STORAGE_DTYPES,
    HnswIndex,
)
from service.gallery.index import ExactIndex  # noqa: E402

RESULTS = ROOT / "bench" / "results"


@dataclass
class IdentifyRow:
    index: str
    enrolled: int
    dim: int
    params: str
    build_s: float
    memory_mib: float
    p50_ms: float
    p99_ms: float
    cpu_p50_ms: float
    recall_at_1: float
    queries: int


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def clustered_gallery(
    n: int, dim: int, queries: int, seed: int, cluster_size: int = 1000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery [n, dim], queries [q, dim], the row each query was drawn from [q]); all L2-normalised.

    `cluster_size` identities share a center on average; 1 gives independent (uniformly spread) identities.
    """
    rng = np.random.default_rng(seed)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    centers = unit(rng.standard_normal((max(1, n // cluster_size), dim), dtype=np.float32))
    gallery = np.empty((n, dim), dtype=np.float32)
    step = 100_000  # generate in slices: bounded temporary memory at 1M
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        labels = rng.integers(0, len(centers), hi - lo)
        noise = rng.standard_normal((hi - lo, dim), dtype=np.float32) * (1.7 / np.sqrt(dim))
        gallery[lo:hi] = unit(centers[labels] + noise)
    source = rng.integers(0, n, queries)
    q = unit(gallery[source] + rng.standard_normal((queries, dim), dtype=np.float32) * (1.0 / np.sqrt(dim)))
    return gallery, q, source


def exact_top1(gallery: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Ground truth by brute force, in query blocks so the score matrix stays small."""
    out = np.empty(len(queries), dtype=np.int64)
    for lo in range(0, len(queries), 64):
        out[lo : lo + 64] = np.argmax(queries[lo : lo + 64] @ gallery.T, axis=1)
    return out


def time_searches(index: object, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-query wall latency [q] in ms, per-query CPU time [q] in ms, and the top-1 key of each query.

    CPU time (this thread's, `time.thread_time`) is what the search costs on a core of its own: on a shared
    machine the wall time also counts the time the thread waited for a CPU.
    """
    lat = np.empty(len(queries))
    cpu = np.empty(len(queries))
    top1 = np.empty(len(queries), dtype=np.int64)
    search = index.search  # type: ignore[attr-defined]
    for i, q in enumerate(queries):
        c0, t0 = time.thread_time(), time.perf_counter()
        _, keys = search(q[None, :], k)
        lat[i], cpu[i] = time.perf_counter() - t0, time.thread_time() - c0
        top1[i] = keys[0, 0]
    return lat * 1e3, cpu * 1e3, top1


def build_hnsw(
    gallery: np.ndarray, args: argparse.Namespace, cache: Path | None, seed: int
) -> tuple[HnswIndex, float, float]:
    """(index, build seconds, memory MiB); loads a cached build of the same data and parameters if present."""
    n, dim = gallery.shape
    graph = f"M{args.connectivity}-ea{args.expansion_add}-{args.dtype}"
    name = f"hnsw-n{n}-d{dim}-s{seed}-c{args.cluster_size}-{graph}"
    path = cache / f"{name}.usearch" if cache else None
    meta = path.with_suffix(".json") if path else None
    if path and meta and path.exists() and meta.exists():
        index = HnswIndex.load(path, dim, threads=1)
        return index, float(json.loads(meta.read_text())["build_s"]), index.memory_bytes / 2**20
    before = rss_bytes()
    index = HnswIndex(
        dim,
        connectivity=args.connectivity,
        expansion_add=args.expansion_add,
        dtype=args.dtype,
        threads=args.build_threads,
    )
    t0 = time.perf_counter()
    for lo in range(0, n, 50_000):
        index.add(np.arange(lo, min(n, lo + 50_000)), gallery[lo : lo + 50_000])
    build_s = time.perf_counter() - t0
    mem = max(index.memory_bytes, rss_bytes() - before) / 2**20
    index.threads = 1  # searches run one query on one thread, as in the service
    if path and meta:
        path.parent.mkdir(parents=True, exist_ok=True)
        index.save(path)
        meta.write_text(json.dumps({"build_s": build_s}))
    return index, build_s, mem


def bench_size(n: int, args: argparse.Namespace) -> list[IdentifyRow]:
    rows: list[IdentifyRow] = []
    gallery, queries, _ = clustered_gallery(n, args.dim, args.queries, args.seed, args.cluster_size)
    truth = exact_top1(gallery, queries)
    cache = None if args.no_cache else RESULTS / "cache"

    if n <= args.exact_max:
        exact = ExactIndex(args.dim)
        t0 = time.perf_counter()
        exact.add(np.arange(n), gallery)
        build_s = time.perf_counter() - t0
        mem = n * (args.dim * 4 + 8) / 2**20  # float32 rows + int64 keys (capacity may be up to 2x)
        nq = min(len(queries), args.exact_queries)
        # A single query is a matrix-vector product: BLAS threads only add hand-off cost, and on a busy
        # machine their spin-waiting multiplies the tail, so the service-like figure uses one thread.
        for label, threads in (("numpy, 1 BLAS thread", 1), ("numpy, default BLAS threads", None)):
            with threadpool_limits(limits=threads, user_api="blas"):
                lat, cpu, top1 = time_searches(exact, queries[:nq], args.k)
            rows.append(
                IdentifyRow(
                    "exact",
                    n,
                    args.dim,
                    label,
                    build_s,
                    mem,
                    float(np.percentile(lat, 50)),
                    float(np.percentile(lat, 99)),
                    float(np.percentile(cpu, 50)),
                    float(np.mean(top1 == truth[:nq])),
                    nq,
                )
            )
        del exact

    index, build_s, mem = build_hnsw(gallery, args, cache, args.seed)
    # Strangers: probes of people who are not enrolled (another seed's identities); with retry_below set,
    # every one of them pays for the wide second search, so their latency is reported separately.
    _, strangers, _ = clustered_gallery(
        10_000, args.dim, min(200, args.queries), args.seed + 1, args.cluster_size
    )
    retry_modes = [None] if args.retry_below is None else [None, args.retry_below]
    for ef in args.expansion_search:
        for retry in retry_modes:
            index.expansion_search = ef
            index.retry_below, index.retry_expansion = retry, args.retry_expansion
            params = f"M={args.connectivity} ef_add={args.expansion_add} ef={ef} {args.dtype}"
            if retry is not None:
                params += f" retry<{retry}@{args.retry_expansion}"
            time_searches(index, queries[:50], args.k)  # warm caches before timing
            probes = [("hnsw", queries, truth)]
            if retry is not None:
                probes.append(("hnsw:stranger", strangers, None))
            for label, qs, want in probes:
                lat, cpu, top1 = time_searches(index, qs, args.k)
                recall = float(np.mean(top1 == want)) if want is not None else float("nan")
                rows.append(
                    IdentifyRow(
                        label,
                        n,
                        args.dim,
                        params,
                        build_s,
                        mem,
                        float(np.percentile(lat, 50)),
                        float(np.percentile(lat, 99)),
                        float(np.percentile(cpu, 50)),
                        recall,
                        len(qs),
                    )
                )
    return rows


def print_table(rows: list[IdentifyRow]) -> None:
    head = (
        f"{'index':13} {'enrolled':>9} {'params':36} {'build s':>8} {'MiB':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'cpu p50':>7} {'R@1':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.index:13} {r.enrolled:>9,} {r.params:36} {r.build_s:>8.1f} {r.memory_mib:>7.1f} "
            f"{r.p50_ms:>7.3f} {r.p99_ms:>7.3f} {r.cpu_p50_ms:>7.3f} {r.recall_at_1:>6.3f}"
        )


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers ("10000,100000")."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    p.add_argument("--sizes", type=int_list, default=[10_000, 100_000, 1_000_000], help="enrolled counts")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000, help="timed single queries per size (HNSW)")
    p.add_argument("--exact-queries", type=int, default=200, help="timed single queries for exact search")
    p.add_argument("--exact-max", type=int, default=1_000_000, help="skip exact search above this size")
    p.add_argument("--k", type=int, default=5, help="top_k of each search")
    p.add_argument("--connectivity", type=int, default=DEFAULT_CONNECTIVITY)
    p.add_argument("--expansion-add", type=int, default=DEFAULT_EXPANSION_ADD)
    p.add_argument(
        "--expansion-search",
        type=int_list,
        default=[DEFAULT_EXPANSION_SEARCH],
        help="one or more (comma-separated); the graph is built once and searched with each",
    )
    p.add_argument("--dtype", choices=STORAGE_DTYPES, default=DEFAULT_DTYPE)
    p.add_argument(
        "--retry-below",
        type=float,
        default=None,
        help="also time each ef with weak matches (best cosine below this) searched again",
    )
    p.add_argument("--retry-expansion", type=int, default=DEFAULT_RETRY_EXPANSION)
    p.add_argument("--build-threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cluster-size",
        type=int,
        default=1000,
        help="identities per cluster center (1: independent identities, an easier case for HNSW)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help=f"rebuild even if {RESULTS / 'cache'} has the graph"
    )
    p.add_argument("--json", type=Path, default=RESULTS / "identify.json")
    args = p.parse_args(argv)
    if args.dim < 1 or args.queries < 1 or args.k < 1 or args.cluster_size < 1:
        p.error("--dim, --queries, --k and --cluster-size must be >= 1")
    return args


def run(args: argparse.Namespace) -> list[IdentifyRow]:
    rows: list[IdentifyRow] = []
    for n in args.sizes:
        rows.extend(bench_size(n, args))
        print_table([r for r in rows if r.enrolled == n])
        print(flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"identify": [asdict(r) for r in rows], "cpus": os.cpu_count()}, indent=2)
    )
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
