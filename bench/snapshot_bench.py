"""Gallery start-up benchmark: rebuilding the HNSW index from the identity store vs loading its snapshot.

For each size: a SQLite identity store holding the synthetic clustered gallery of `identify_bench` (same seed,
so keys 0..n-1 match the graphs it caches), then
  rebuild   `Gallery(..., index_factory=hnsw)`: `iter_all` + one HNSW insert per identity, as a start without
            a snapshot does (measured up to --rebuild-max; above it the cached graph's recorded build time)
  save      `save_snapshot`: graph file, sha256, manifest (and the part that holds searches off: usearch save)
  load      `open_gallery` on that snapshot: checksum, usearch load, key -> name from the store, replay of
            --changes writes made after the snapshot, key check: the whole start-up path of the service
plus the parts of the load and the alternative of keeping key -> name in the snapshot (a JSON file).

    python bench/snapshot_bench.py                       # 100k (rebuild ~1-2 min here) and 1M if cached
    python bench/snapshot_bench.py --sizes 100000 --changes 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.identify_bench import clustered_gallery  # noqa: E402
from service.gallery.ann import HnswIndex, make_index  # noqa: E402
from service.gallery.gallery import Gallery  # noqa: E402
from service.gallery.snapshot import file_sha256, open_gallery, save_snapshot  # noqa: E402
from service.gallery.store import SQLiteIdentityStore  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CACHE = RESULTS / "cache"


@dataclass
class SnapshotRow:
    identities: int
    rebuild_s: float
    rebuild_measured: bool  # False: the cached graph's recorded build time, not re-measured
    iter_all_s: float  # of the rebuild: reading every identity from the store
    save_s: float  # save_snapshot total
    usearch_save_s: float  # of it: the part that holds searches and enrollments off
    index_mib: float
    load_s: float  # open_gallery from the snapshot, changes included
    sha256_s: float
    usearch_load_s: float
    names_from_store_s: float  # SELECT key, name
    names_from_json_s: float  # the alternative: key -> name kept in the snapshot
    changes: int
    speedup: float


def fill_store(path: Path, vectors: np.ndarray) -> SQLiteIdentityStore:
    """A store holding `vectors` under keys 0..n-1, written in one transaction (store.add fsyncs each)."""
    store = SQLiteIdentityStore(path, vectors.shape[1])
    created = datetime.now(UTC).isoformat()
    rows = ((i, f"id-{i}", v.tobytes(), len(v), 1, "bench:1", "{}", created) for i, v in enumerate(vectors))
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO identities (key, name, embedding, dim, image_count, model_id, metadata, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    return store


def cached_graph(n: int, dim: int, seed: int, cluster_size: int) -> tuple[Path, float] | None:
    name = f"hnsw-n{n}-d{dim}-s{seed}-c{cluster_size}-M16-ea128-f16"
    path, meta = CACHE / f"{name}.usearch", CACHE / f"{name}.json"
    if path.exists() and meta.exists():
        return path, float(json.loads(meta.read_text())["build_s"])
    return None


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def bench_size(n: int, args: argparse.Namespace, work: Path) -> SnapshotRow:
    vectors, _, _ = clustered_gallery(n, args.dim, 1, args.seed, args.cluster_size)
    store = fill_store(work / f"ids-{n}.sqlite3", vectors)
    factory = partial(make_index, "hnsw", retry_below=0.5)
    cached = cached_graph(n, args.dim, args.seed, args.cluster_size)
    labels = ["c0"]
    centers = np.eye(1, args.dim, dtype=np.float32)
    _, iter_all_s = timed(lambda: sum(len(b) for b in store.iter_all()))
    if n <= args.rebuild_max or cached is None:
        gallery, rebuild_s = timed(Gallery, centers, labels, store, index_factory=factory)
        measured = True
    else:
        path, rebuild_s = cached
        index = factory(args.dim).restored(path)  # type: ignore[attr-defined]
        gallery = Gallery.with_index(centers, labels, store, index, store.names_by_key())
        measured = False
    snap = work / f"snap-{n}"
    manifest, save_s = timed(save_snapshot, snap, gallery, store.change_cursor)
    with gallery.frozen() as index:
        assert isinstance(index, HnswIndex)
        _, usearch_save_s = timed(index.save, work / "probe.usearch")
    (work / "probe.usearch").unlink()
    index_file = snap / manifest.index_file
    _, sha_s = timed(file_sha256, index_file)
    _, usearch_load_s = timed(HnswIndex.load, index_file, args.dim)
    names, names_store_s = timed(store.names_by_key)
    names_json = work / "names.json"
    names_json.write_text(json.dumps(names))
    _, names_json_s = timed(lambda: {int(k): v for k, v in json.loads(names_json.read_text()).items()})
    rng = np.random.default_rng(1)
    for i in range(args.changes):  # writes after the snapshot, replayed at start-up
        v = rng.standard_normal(args.dim).astype(np.float32)
        store.add(f"late-{i}", v / np.linalg.norm(v), image_count=1, model_id="bench:1")
    del gallery
    start, load_s = timed(open_gallery, snap, centers, labels, store, index_factory=factory)
    assert start.source == "snapshot" and start.gallery.num_enrolled == n + args.changes, start.refused
    store.close()
    return SnapshotRow(
        identities=n,
        rebuild_s=round(rebuild_s, 2),
        rebuild_measured=measured,
        iter_all_s=round(iter_all_s, 2),
        save_s=round(save_s, 2),
        usearch_save_s=round(usearch_save_s, 2),
        index_mib=round(manifest.index_bytes / 2**20, 1),
        load_s=round(load_s, 2),
        sha256_s=round(sha_s, 2),
        usearch_load_s=round(usearch_load_s, 2),
        names_from_store_s=round(names_store_s, 2),
        names_from_json_s=round(names_json_s, 2),
        changes=start.replayed,
        speedup=round(rebuild_s / load_s, 1),
    )


def print_table(rows: list[SnapshotRow]) -> None:
    print(
        f"{'identities':>10} {'rebuild s':>10} {'save s':>7} {'(usearch)':>9} {'MiB':>6} {'load s':>7} "
        f"{'sha256':>7} {'usearch':>8} {'names db':>9} {'names json':>10} {'changes':>8} {'x faster':>8}"
    )
    for r in rows:
        rebuild = f"{r.rebuild_s:.1f}" + ("" if r.rebuild_measured else "*")
        print(
            f"{r.identities:>10,} {rebuild:>10} {r.save_s:>7.2f} {r.usearch_save_s:>9.2f} "
            f"{r.index_mib:>6.0f} {r.load_s:>7.2f} {r.sha256_s:>7.2f} {r.usearch_load_s:>8.2f} "
            f"{r.names_from_store_s:>9.2f} {r.names_from_json_s:>10.2f} {r.changes:>8} {r.speedup:>8.0f}"
        )
    if any(not r.rebuild_measured for r in rows):
        print("* build time recorded with the cached graph (bench/results/cache), not re-measured")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated gallery sizes")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cluster-size", type=int, default=1000)
    p.add_argument(
        "--rebuild-max",
        type=int,
        default=100_000,
        help="largest size rebuilt for real; above it the cached graph is used (sizes without one: skipped)",
    )
    p.add_argument(
        "--changes", type=int, default=100, help="writes made after the snapshot, replayed at load"
    )
    p.add_argument("--json", type=Path, default=RESULTS / "snapshot_bench.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="snapshot-bench-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            if n > args.rebuild_max and cached_graph(n, args.dim, args.seed, args.cluster_size) is None:
                print(f"skipping {n:,}: no cached graph in {CACHE} and above --rebuild-max")
                continue
            work = Path(tmp) / str(n)
            work.mkdir()
            rows.append(bench_size(n, args, work))
            print(json.dumps(asdict(rows[-1])), flush=True)
            shutil.rmtree(work)
    print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    args.json.write_text(
        json.dumps({"snapshot": [asdict(r) for r in rows], "loadavg": load, "cpus": os.cpu_count()}, indent=2)
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
