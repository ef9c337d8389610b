"""DELETE erases: no byte of a deleted identity's vector stays in the SQLite file, its WAL, or the snapshot.

Each check first finds the vector's bytes in the files while the identity is enrolled (so the scan is shown
to see them), then deletes it and scans again. The gallery snapshot stores vectors as float16 by default,
so both encodings are searched for. PostgreSQL is in test_pg_store.py (it needs a server).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_testkit import API_KEY

from service.app import create_app
from service.core.config import Settings

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
