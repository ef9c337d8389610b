"""DELETE erases: no byte of a deleted identity's vector stays in the SQLite file, its WAL, or the snapshot.

Each check first finds the vector's bytes in the files while the identity is enrolled (so the scan is shown
to see them), then deletes it and scans again. The gallery snapshot stores vectors as float16 by default,
so both encodings are searched for. PostgreSQL: the table's files after VACUUM FULL (skipped without a local
server).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.core.config import Settings
from testkit.service_helpers import API_KEY

AUTH = {"X-API-Key": API_KEY}
DIM = 16


def distinctive(seed: int) -> list[float]:
    v = np.random.default_rng(seed).normal(size=DIM)
    return (v / np.linalg.norm(v)).tolist()


def stored_vector(db: Path, name: str) -> np.ndarray:
    with sqlite3.connect(db) as conn:
        (blob,) = conn.execute("SELECT embedding FROM identities WHERE name = ?", (name,)).fetchone()
    return np.frombuffer(blob, dtype=np.float32)


def patterns(vector: np.ndarray) -> dict[str, bytes]:
    """The vector as stored (float32) and as the HNSW snapshot keeps it (float16); the first 8 values each,
    long enough to never occur by chance, short enough to catch a vector split across pages."""
    return {
        "f32": vector[:8].astype(np.float32).tobytes(),
        "f16": vector[:8].astype(np.float16).tobytes(),
    }


def files_holding(paths: list[Path], needle: bytes) -> list[str]:
    return [p.name for p in paths if p.is_file() and needle in p.read_bytes()]


@pytest.mark.asyncio
async def test_deleted_identity_leaves_no_vector_bytes_in_sqlite_wal_or_snapshot(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    db = tmp_path / "erase.sqlite3"
    snap = tmp_path / "snapshot"
    settings = make_settings(
        store_url=f"sqlite:///{db}", gallery_index="hnsw", gallery_snapshot_path=snap, api_keys=[API_KEY]
    )
    app = create_app(settings)
    files = lambda: [db, db.with_name(db.name + "-wal"), *snap.glob("*")]  # noqa: E731
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        for name, seed in (("keeper", 1), ("victim", 2)):
            body = {"name": name, "embeddings": [distinctive(seed)]}
            assert (await c.post("/v1/identities", json=body, headers=AUTH)).status_code == 201
        # Replace once, so an older version of the victim's vector was also written.
        body = {"name": "victim", "embeddings": [distinctive(3)], "replace": True}
        old = patterns(stored_vector(db, "victim"))
        assert (await c.post("/v1/identities", json=body, headers=AUTH)).status_code == 201
        victim, keeper = patterns(stored_vector(db, "victim")), patterns(stored_vector(db, "keeper"))
        assert (await c.post("/v1/admin/snapshot", headers=AUTH)).status_code == 200
        # The scan sees vectors where they are: store (file or WAL) and snapshot.
        assert files_holding(files(), victim["f32"]), "the scan should find the enrolled vector"
        assert files_holding(list(snap.glob("*")), victim["f16"])

        assert (await c.delete("/v1/identities/victim", headers=AUTH)).status_code == 204
        assert (await c.post("/v1/admin/snapshot", headers=AUTH)).status_code == 200
        for label, pattern in {**victim, **{f"old-{k}": v for k, v in old.items()}}.items():
            assert files_holding(files(), pattern) == [], f"deleted vector ({label}) still on disk"
        assert files_holding([db, db.with_name(db.name + "-wal")], keeper["f32"]), "keeper must remain"
        assert files_holding(list(snap.glob("*")), keeper["f16"])
        # The change feed says a key was deleted, and nothing about its vector.
        with sqlite3.connect(db) as conn:
            assert {r[1] for r in conn.execute("PRAGMA table_info(identity_changes)")} == {"seq", "key", "op"}


def test_deleted_identity_leaves_no_vector_bytes_in_the_postgres_table(pg_url: str) -> None:
    import psycopg

    from service.gallery.store.postgres import PostgresIdentityStore

    store = PostgresIdentityStore(pg_url, DIM)
    vectors = {f"p{i}": np.asarray(distinctive(100 + i), dtype=np.float32) for i in range(50)}
    try:
        for name, v in vectors.items():
            store.add(name, v, image_count=1, model_id="m")
        # The most recently written row: the one plain VACUUM would leave behind (nothing moves over it).
        store.add(
            "p49", np.asarray(distinctive(999), dtype=np.float32), image_count=1, model_id="m", replace=True
        )
        with psycopg.connect(pg_url, autocommit=True) as conn:
            data_dir = Path(conn.execute("SHOW data_directory").fetchone()[0])  # type: ignore[index]

            def table_files() -> list[Path]:
                conn.execute("CHECKPOINT")  # shared buffers -> files, so the scan sees what is on disk
                rels = ("identities", "identities_pkey", "identities_name_key")
                paths = [conn.execute("SELECT pg_relation_filepath(%s)", (r,)).fetchone()[0] for r in rels]  # type: ignore[index]
                toast = conn.execute(
                    "SELECT pg_relation_filepath(reltoastrelid) FROM pg_class WHERE relname = 'identities'"
                ).fetchone()[0]  # type: ignore[index]
                base = [data_dir / p for p in paths + ([toast] if toast else [])]
                return [f for p in base for f in [p, *p.parent.glob(p.name + ".*")] if f.is_file()]

            victim = patterns(vectors["p20"])["f32"]
            replaced = patterns(vectors["p49"])["f32"]
            keeper = patterns(vectors["p10"])["f32"]
            assert files_holding(table_files(), victim), "the scan should find the enrolled vector"
            assert store.delete("p20") is not None
            store.delete("p48")
            files = table_files()
            assert files_holding(files, victim) == [] and files_holding(files, replaced) == []
            assert files_holding(files, patterns(vectors["p48"])["f32"]) == []
            assert files_holding(files, keeper), "live rows must remain"
    finally:
        store.close()
