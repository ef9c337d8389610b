"""Durable storage of enrolled identities: the `IdentityStore` protocol and its SQLite (WAL) implementation.

The gallery keeps its search index in memory; the store is the source of truth it is rebuilt from at start-up.
Every write is committed (and, in WAL mode with `synchronous=FULL`, fsync'd) before the call returns, so an
identity whose enrollment was acknowledged survives a restart, a crash or `kill -9`, and a write that was not
acknowledged is either fully present or absent, never half-written (SQLite transactions are atomic).

Other backends (PostgreSQL + pgvector in `service/gallery/pg*.py`) implement the same protocol; `open_store`
picks one from a URL so the service never names a backend class itself.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


class StoreError(Exception):
    """The store cannot be opened or used (bad URL, unreadable file, wrong embedding dimension)."""


class IdentityExistsError(Exception):
    """An enrollment used a name that is already enrolled and did not ask to replace it."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"identity {name!r} is already enrolled")


@dataclass(frozen=True)
class EnrolledIdentity:
    """One enrolled identity as stored.

    `key` is the int64 the store assigned: the gallery uses it as the vector-index key. It is stable for the
    life of the identity, including across `replace=True` re-enrollment, so replacing never leaves a stale
    vector in the index.
    """

    key: int
    name: str
    embedding: np.ndarray  # float32 [dim], L2-normalised
    image_count: int
    model_id: str  # the model that produced `embedding`; another model's space is not comparable
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@runtime_checkable
class IdentityStore(Protocol):
    """What the gallery needs from durable storage. Implementations must be safe to call from several threads.

    Names are unique; `add` with an existing name raises `IdentityExistsError` unless `replace=True`, which
    overwrites embedding, image count, model id, metadata and created_at but keeps the key.
    """

    dim: int

    def add(
        self,
        name: str,
        embedding: np.ndarray,
        *,
        image_count: int,
        model_id: str,
        metadata: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> tuple[EnrolledIdentity, bool]:
        """Durably store one identity; returns (the stored record, True if an existing one was replaced)."""

    def get(self, name: str) -> EnrolledIdentity | None:
        """The identity enrolled under `name`, or None."""

    def get_by_keys(self, keys: list[int]) -> dict[int, EnrolledIdentity]:
        """Records for these keys (missing keys are absent from the result)."""

    def delete(self, name: str) -> EnrolledIdentity | None:
        """Remove `name`; returns the removed record (so the caller can drop its key), or None if unknown."""

    def list(self, *, offset: int = 0, limit: int = 100) -> list[EnrolledIdentity]:
        """A page of identities in enrollment order (by key)."""

    def count(self) -> int:
        """How many identities are enrolled."""

    def iter_all(self, batch_size: int = 10_000) -> Iterator[list[EnrolledIdentity]]:
        """Every identity, in batches, to (re)build the in-memory index."""

    def close(self) -> None:
        """Release connections; further calls are an error."""


@runtime_checkable
class ChangeFeedStore(Protocol):
    """A store shared by several replicas that reports changes (PostgreSQL); SQLite is single-process."""

    def change_cursor(self) -> int:
        """Sequence number of the newest change; follow changes after it to keep an index in sync."""


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
"""

_COLUMNS = "key, name, embedding, dim, image_count, model_id, metadata, created_at"


def check_embedding(embedding: np.ndarray, dim: int) -> np.ndarray:
    vec = np.ascontiguousarray(np.asarray(embedding, dtype=np.float32).reshape(-1))
    if vec.shape != (dim,):
        raise ValueError(f"embedding has {vec.size} values, the store holds {dim}-d embeddings")
    if not np.all(np.isfinite(vec)):
        raise ValueError("embedding contains NaN or infinite values")
    return vec


class SQLiteIdentityStore:
    """`IdentityStore` on one SQLite file in WAL mode.

    WAL lets readers (list/get) proceed while a write commits; `synchronous=FULL` makes each commit durable
    before `add`/`delete` returns. One connection guarded by a lock: SQLite serialises writers anyway, and the
    calls are short, so a pool would add complexity without throughput.
    """

    def __init__(self, path: Path | str, dim: int) -> None:
        self.path = Path(path)
        self.dim = int(dim)
        if self.dim < 1:
            raise StoreError(f"store {self.path}: embedding dim must be >= 1, got {dim}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open identity store {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        self._check_dim()

    def _check_dim(self) -> None:
        with self._lock:
            row = self._db.execute("SELECT v FROM store_info WHERE k = 'dim'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO store_info (k, v) VALUES ('dim', ?)", (str(self.dim),))
                return
        stored = int(row[0])
        if stored != self.dim:
            raise StoreError(
                f"identity store {self.path} holds {stored}-d embeddings but the model produces "
                f"{self.dim}-d; use another store (IDEMBED_STORE_URL) or re-enroll with the new model"
            )

    def _row(self, row: tuple[Any, ...]) -> EnrolledIdentity:
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
    ) -> tuple[EnrolledIdentity, bool]:
        vec = check_embedding(embedding, self.dim)
        meta = json.dumps(metadata or {}, ensure_ascii=False, sort_keys=True)
        created = datetime.now(UTC)
        values = (vec.tobytes(), self.dim, int(image_count), model_id, meta, created.isoformat())
        with self._lock:
            # BEGIN IMMEDIATE takes the write lock up front, so the existence check and the write are atomic
            # even against another process sharing the file.
            self._db.execute("BEGIN IMMEDIATE")
            try:
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
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
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

    def get(self, name: str) -> EnrolledIdentity | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM identities WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._row(row)

    def get_by_keys(self, keys: list[int]) -> dict[int, EnrolledIdentity]:
        if not keys:
            return {}
        wanted = sorted({int(k) for k in keys})
        marks = ",".join("?" * len(wanted))
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM identities WHERE key IN ({marks})", wanted)
            records = [self._row(r) for r in rows.fetchall()]
        return {r.key: r for r in records}

    def delete(self, name: str) -> EnrolledIdentity | None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                query = f"SELECT {_COLUMNS} FROM identities WHERE name = ?"
                row = self._db.execute(query, (name,)).fetchone()
                if row is not None:
                    self._db.execute("DELETE FROM identities WHERE key = ?", (row[0],))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None if row is None else self._row(row)

    def list(self, *, offset: int = 0, limit: int = 100) -> list[EnrolledIdentity]:
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must be >= 0")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM identities ORDER BY key LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return [self._row(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM identities").fetchone()[0])

    def iter_all(self, batch_size: int = 10_000) -> Iterator[list[EnrolledIdentity]]:
        # Keyset pagination: stable and O(batch) per page, unlike OFFSET on a large table.
        last = 0
        while True:
            with self._lock:
                query = f"SELECT {_COLUMNS} FROM identities WHERE key > ? ORDER BY key LIMIT ?"
                rows = self._db.execute(query, (last, batch_size)).fetchall()
            if not rows:
                return
            batch = [self._row(r) for r in rows]
            last = batch[-1].key
            yield batch

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(url: str, dim: int) -> IdentityStore:
    """Open the store a URL names: `sqlite:///path/to/file.db` (or a bare path) or `postgresql://...`.

    PostgreSQL support lives in `service.gallery.pg_store` (engineer F) and must expose
    `PostgresIdentityStore(url: str, dim: int)` implementing `IdentityStore`; it is imported only when asked
    for, so the default install needs no database driver.
    """
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from service.gallery.pg_store import PostgresIdentityStore
        except ImportError as exc:
            raise StoreError(
                f"store URL {url.split('@')[-1]!r} needs PostgreSQL support: pip install '.[pg]' ({exc})"
            ) from exc
        return PostgresIdentityStore(url, dim)
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if "://" in path:
        raise StoreError(f"unsupported store URL scheme in {url!r}; use sqlite:///path or postgresql://...")
    return SQLiteIdentityStore(path, dim)
