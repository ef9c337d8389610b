"""`IdentityStore` on one SQLite file in WAL mode, with a change feed (the default store).

WAL lets readers (list/get) proceed while a write commits; `synchronous=FULL` makes each commit durable
(fsync) before `add`/`delete` returns, so an acknowledged enrollment survives `kill -9`. One connection
guarded by a lock: SQLite serialises writers anyway, and the calls are short, so a pool would add complexity
without throughput. `BEGIN IMMEDIATE` takes the write lock up front, even against another process sharing
the file, so change sequence numbers are in commit order.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service.gallery.store.base import (
    EnrolledIdentity,
    IdentityExistsError,
    SqlIdentityStore,
    StoreError,
    check_embedding,
)

log = logging.getLogger("idembed.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    key         INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL UNIQUE,
    embedding   BLOB    NOT NULL,
    dim         INTEGER NOT NULL,
    image_count INTEGER NOT NULL CHECK (image_count >= 0),
    model_id    TEXT    NOT NULL,
    metadata    TEXT    NOT NULL,
    created_at  TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS store_info (
    k TEXT PRIMARY KEY,
    v TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS identity_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key INTEGER NOT NULL,
    op  TEXT    NOT NULL CHECK (op IN ('u', 'd'))
);
CREATE TABLE IF NOT EXISTS identity_images (
    key   INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    image BLOB    NOT NULL,
    PRIMARY KEY (key, idx)
);
"""
# `CREATE TABLE IF NOT EXISTS` is also the migration of files written before the change feed existed: their
# identities predate every change (cursor 0), which is exactly what an index built from them reflects.


class SQLiteIdentityStore(SqlIdentityStore):
    """`IdentityStore` and `ChangeFeedStore` on one SQLite file."""

    _INFO = "store_info"
    _COLUMNS = "key, name, embedding, dim, image_count, model_id, metadata, created_at"
    transient_errors = (sqlite3.OperationalError,)  # e.g. "database is locked" past the busy timeout
    # The WAL checkpoint that overwrites a deleted vector's old pages cannot finish while another process
    # reads the file; erasure is verified with one process per file only.
    erases_with_other_processes = False

    def __init__(self, path: Path | str, dim: int) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self.dim = int(dim)
        if self.dim < 1:
            raise StoreError(f"store {self.path}: embedding dim must be >= 1, got {dim}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Erasure: freed cells and pages are overwritten with zeros, so a deleted (or replaced) vector
            # leaves no bytes in the file; `_erase_deleted` then clears the older page copies from the WAL.
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open identity store {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        self._check_dim()
        self._store_id = self._ensure_store_id(uuid.uuid4().hex)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def _read_snapshot(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def _vector(self, vec: np.ndarray) -> object:
        return vec.tobytes()

    def _keys_in(self, keys: list[int]) -> tuple[str, tuple[Any, ...]]:
        return f"key IN ({','.join('?' * len(keys))})", tuple(keys)

    def _erase_deleted(self) -> None:
        """Copy the WAL into the file and truncate it to zero bytes: the WAL still holds the page images
        written before a delete or replace, vector included. Costs one checkpoint (~1 ms at small sizes)."""
        with self._lock:
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            # A reader in another process holds an older snapshot; the next checkpoint finishes the job.
            log.warning(
                "identity store %s: WAL checkpoint blocked by a reader; erased on the next one", self.path
            )

    def _record(self, row: tuple[Any, ...]) -> EnrolledIdentity:
        key, name, blob, dim, image_count, model_id, metadata, created_at = row
        return EnrolledIdentity(
            key=int(key),
            name=name,
            embedding=np.frombuffer(blob, dtype=np.float32, count=dim).copy(),
            image_count=int(image_count),
            model_id=model_id,
            metadata=json.loads(metadata),
            created_at=datetime.fromisoformat(created_at),
        )

    def add(
        self,
        name: str,
        embedding: np.ndarray,
        *,
        image_count: int,
        model_id: str,
        metadata: dict[str, Any] | None = None,
        replace: bool = False,
        images: list[bytes] | None = None,
    ) -> tuple[EnrolledIdentity, bool]:
        vec = check_embedding(embedding, self.dim)
        meta = json.dumps(metadata or {}, ensure_ascii=False, sort_keys=True)
        created = datetime.now(UTC)
        values = (vec.tobytes(), self.dim, int(image_count), model_id, meta, created.isoformat())
        with self._write():
            # Inside the write transaction, so the existence check and the write are atomic.
            existing = self._db.execute("SELECT key FROM identities WHERE name = ?", (name,)).fetchone()
            if existing is not None and not replace:
                raise IdentityExistsError(name)
            if existing is None:
                cur = self._db.execute(
                    "INSERT INTO identities (name, embedding, dim, image_count, model_id, metadata, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (name, *values),
                )
                key = int(cur.lastrowid)
            else:
                key = int(existing[0])
                self._db.execute(
                    "UPDATE identities SET embedding = ?, dim = ?, image_count = ?, model_id = ?, "
                    "metadata = ?, created_at = ? WHERE key = ?",
                    (*values, key),
                )
            self._keep_images(key, images)
            self._log_change(key, "u")
        if existing is not None:
            self._erase_deleted()  # the replaced vector's page images
        record = EnrolledIdentity(
            key=key,
            name=name,
            embedding=vec,
            image_count=int(image_count),
            model_id=model_id,
            metadata=json.loads(meta),
            created_at=created,
        )
        return record, existing is not None
