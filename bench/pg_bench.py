"""PostgreSQL replicas: query pgvector's HNSW directly, or keep a local index in sync? Measured side by side.

Same synthetic gallery as identify_bench. pgvector: rows COPYed into `vector(dim)`, an HNSW index built with
`vector_ip_ops`, one query per round trip from psycopg over 127.0.0.1 (what a replica would pay per identify).
Local: `HnswIndex` in process, filled from the same rows, plus how long a replica takes to load them from
PostgreSQL (`PostgresIdentityStore.iter_all`) and to apply a change through the change feed.

    python bench/pg_bench.py --size 100000
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psycopg
from identify_bench import clustered_gallery, exact_top1, time_searches
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb

from service.gallery.ann import DEFAULT_CONNECTIVITY, DEFAULT_EXPANSION_SEARCH, HnswIndex
from service.gallery.store.postgres import PostgresIdentityStore
from testkit.pg_local import local_postgres

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class PgRow:
    method: str
    enrolled: int
    params: str
    build_s: float
    p50_ms: float
    p99_ms: float
    recall_at_1: float


def pgvector_rows(
    url: str, gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray, efs: list[int]
) -> list[PgRow]:
    n, dim = gallery.shape
    rows = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        conn.execute(f"CREATE TABLE bench_vectors (key bigint PRIMARY KEY, embedding vector({dim}) NOT NULL)")
        t0 = time.perf_counter()
        with conn.cursor().copy(
            "COPY bench_vectors (key, embedding) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "vector"])
            for i in range(n):
                copy.write_row((i, gallery[i]))
        load_s = time.perf_counter() - t0
        conn.execute("SET maintenance_work_mem = '1GB'")
        t0 = time.perf_counter()
        conn.execute(
            "CREATE INDEX ON bench_vectors USING hnsw (embedding vector_ip_ops) "
            f"WITH (m = {DEFAULT_CONNECTIVITY}, ef_construction = 128)"
        )
        build_s = time.perf_counter() - t0
        for ef in efs:
            conn.execute(f"SET hnsw.ef_search = {ef}")
            lat, top1 = [], []
            for i, q in enumerate(queries):
                t = time.perf_counter()
                # <#> is negative inner product, so ascending order is descending cosine.
                found = conn.execute(
                    "SELECT key, -(embedding <#> %s) FROM bench_vectors ORDER BY embedding <#> %s LIMIT 5",
                    (q, q),
                ).fetchall()
                if i >= 20:  # the first queries warm the buffer cache
                    lat.append(time.perf_counter() - t)
                    top1.append(found[0][0] if found else -1)
            rows.append(
                PgRow(
                    "pgvector HNSW (SQL round trip)",
                    n,
                    f"m={DEFAULT_CONNECTIVITY} ef_construction=128 ef_search={ef}; COPY {load_s:.1f}s",
                    build_s,
                    float(np.percentile(lat, 50) * 1e3),
                    float(np.percentile(lat, 99) * 1e3),
                    float(np.mean(np.asarray(top1) == truth[20:])),
                )
            )
        conn.execute("DROP TABLE bench_vectors")
    return rows


def replica_rows(
    url: str, gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray, batch: int
) -> list[PgRow]:
    """Fill the identity store, then time what a replica does: load everything into a local index, search."""
    n, dim = gallery.shape
    store = PostgresIdentityStore(url, dim)
    try:
        # Bulk-fill through COPY: enrolling 100k identities one by one only measures the client loop.
        with psycopg.connect(url, autocommit=True) as conn:
            register_vector(conn)
            columns = "name, embedding, image_count, model_id, metadata"
            with conn.cursor().copy(f"COPY identities ({columns}) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["text", "vector", "int4", "text", "jsonb"])
                for i in range(n):
                    copy.write_row((f"id{i}", gallery[i], 1, "bench", Jsonb({})))
        index = HnswIndex(dim, threads=2)
        t0 = time.perf_counter()
        key_of_row = np.empty(n, dtype=np.int64)
        for records in store.iter_all(batch):
            keys = np.array([r.key for r in records])
            index.add(keys, np.stack([r.embedding for r in records]))
            for r in records:
                key_of_row[int(r.name[2:])] = r.key
        sync_s = time.perf_counter() - t0
        index.threads = 1
        time_searches(index, queries[:20], 5)
        lat, _, top1 = time_searches(index, queries[20:], 5)
        row = PgRow(
            "local HnswIndex synced from PostgreSQL",
            n,
            f"M={DEFAULT_CONNECTIVITY} ef={DEFAULT_EXPANSION_SEARCH}; build includes iter_all",
            sync_s,
            float(np.percentile(lat, 50)),
            float(np.percentile(lat, 99)),
            float(np.mean(top1 == key_of_row[truth[20:]])),
        )
        # One enrollment on another replica, seen here through the change feed.
        cursor = store.change_cursor()
        writer = PostgresIdentityStore(url, dim)
        writer.add("late", gallery[0], image_count=1, model_id="bench")
        t0 = time.perf_counter()
        change = store.changes_since(cursor)
        index.add(np.array([r.key for r in change.upserts]), np.stack([r.embedding for r in change.upserts]))
        apply_ms = (time.perf_counter() - t0) * 1e3
        writer.close()
        row.params += f"; change feed apply {apply_ms:.2f} ms"
        return [row]
    finally:
        store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--ef-search", default="100,256", help="pgvector hnsw.ef_search values (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=RESULTS / "pg.json")
    args = p.parse_args()
    try:
        efs = [int(v) for v in args.ef_search.split(",")]
    except ValueError:
        p.error(f"--ef-search: expected comma-separated integers, got {args.ef_search!r}")
    if args.size < 100 or args.queries < 40:
        p.error("--size must be >= 100 and --queries >= 40")
    rows = run(args.size, args.dim, args.queries, efs, args.seed)
    print_rows(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    print(f"wrote {args.json}")


def run(size: int, dim: int, queries: int, efs: list[int], seed: int) -> list[PgRow]:
    gallery, q, _ = clustered_gallery(size, dim, queries, seed)
    truth = exact_top1(gallery, q)
    with local_postgres() as url:
        rows = pgvector_rows(url, gallery, q, truth, efs)
        rows += replica_rows(url, gallery, q, truth, batch=10_000)
    return rows


def print_rows(rows: list[PgRow]) -> None:
    print(f"{'method':40} {'enrolled':>9} {'build s':>8} {'p50 ms':>7} {'p99 ms':>7} {'R@1':>6}  params")
    for r in rows:
        print(
            f"{r.method:40} {r.enrolled:>9,} {r.build_s:>8.1f} {r.p50_ms:>7.3f} {r.p99_ms:>7.3f} "
            f"{r.recall_at_1:>6.3f}  {r.params}"
        )


if __name__ == "__main__":
    main()
