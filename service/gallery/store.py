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
import logging
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

log = logging.getLogger("idembed.store")


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


@dataclass(frozen=True)
class ServedModel:
    """Which model embeds against a store: its id (`name:version`, stored with every identity) and a
    fingerprint of what makes its embeddings (model.onnx digest and preprocessing), which tells apart two
    bundles given the same name:version (a retrain exported with the default version)."""

    model_id: str
    fingerprint: str

    def info_rows(self) -> list[tuple[str, str]]:
        """Store-info rows recording it (as served now, and as the model behind its id)."""
        return [("served_model_id", self.model_id), (f"fingerprint:{self.model_id}", self.fingerprint)]


@dataclass(frozen=True)
class ModelHistory:
    """What a store remembers of the models served from it (recorded by the service at start and reload)."""

    served: str | None  # model id served last (None: a store from before this was recorded)
    fingerprints: dict[str, str]  # model id -> fingerprint of the bundle that served under that id

    @classmethod
    def from_rows(cls, rows: list[tuple[Any, Any]]) -> ModelHistory:
        values = {str(k): str(v) for k, v in rows}
        prefix = "fingerprint:"
        prints = {k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}
        return cls(values.get("served_model_id"), prints)


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
        images: list[bytes] | None = None,
    ) -> tuple[EnrolledIdentity, bool]:
        """Durably store one identity; returns (the stored record, True if an existing one was replaced).
        `images` (the enrollment images, kept only when the service is told to) are stored with it in the
        same transaction and replace any kept before; deleting the identity deletes them."""

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

    def names_by_key(self, model_id: str | None = None) -> dict[int, str]:
        """Key -> name of every identity (of those `model_id` enrolled, if given), without embeddings (names
        for an index loaded from disk)."""

    def count_by_model(self) -> dict[str, int]:
        """How many identities each model enrolled (model id -> count; models with none are absent)."""

    def model_history(self) -> ModelHistory:
        """The model the service last served from this store and the fingerprint of every model served."""

    def record_served_model(self, model: ServedModel) -> None:
        """Remember the model now served, so that a start with another one knows what it would orphan."""

    def count_with_images_by_model(self) -> dict[str, int]:
        """Like `count_by_model`, counting only identities whose enrollment images are kept."""

    def images_of(self, keys: list[int]) -> dict[int, list[bytes]]:
        """The kept enrollment images of these identities (keys without any are absent)."""

    def reembed(self, from_model: str, to_model: str, templates: dict[int, np.ndarray]) -> list[int]:
        """Replace the templates of identities `from_model` enrolled with `to_model`'s (re-embedded from
        their kept images), in one transaction; a key no longer of `from_model` (deleted, or re-enrolled
        meanwhile) is left alone. Returns the keys updated."""

    def store_id(self) -> str:
        """A random id made when the store was created: tells a gallery snapshot which store it belongs to."""

    def close(self) -> None:
        """Release connections; further calls are an error."""


@dataclass(frozen=True)
class ChangeBatch:
    """Changes after a cursor: identities to (re)index, keys to drop, and the cursor to ask from next time."""

    cursor: int
    upserts: list[EnrolledIdentity]
    deleted: list[int]

    @classmethod
    def net(cls, cursor: int, changes: list[tuple[int, int]], current: list[EnrolledIdentity]) -> ChangeBatch:
        """From change rows `(seq, key)` after `cursor` and the current records of their keys: the current row
        decides, whatever the op sequence was (present -> upsert, absent -> delete)."""
        if not changes:
            return cls(cursor, [], [])
        present = {r.key for r in current}
        touched = sorted({int(key) for _, key in changes})
        return cls(int(changes[-1][0]), current, [k for k in touched if k not in present])


@runtime_checkable
class ChangeFeedStore(Protocol):
    """A store that logs every write as (seq, key, op) in the same transaction, so an index built at one
    cursor (at start-up, or saved in a gallery snapshot) can be brought up to date with the writes after it.

    `shared_by_replicas` says whether other server processes write it and each must follow the feed
    continuously (PostgreSQL); the SQLite store is written by one process, which sees its own writes.
    """

    shared_by_replicas: bool

    def change_cursor(self) -> int:
        """Sequence number of the newest change; follow changes after it to keep an index in sync."""

    def changes_since(self, cursor: int, limit: int = 10_000) -> ChangeBatch:
        """Net changes after `cursor`; raises `StoreError` if the feed was pruned past it."""

    def prune_changes(self, keep_last: int = 100_000) -> int:
        """Drop all but the newest `keep_last` change rows; returns how many were dropped."""


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

_COLUMNS = "key, name, embedding, dim, image_count, model_id, metadata, created_at"
# Where keyset pagination starts: below every int64 key. Not 0: a row keyed 0 (written by hand or by a tool
# that chose its own keys) would be skipped by `key > 0` and silently missing from the index.
KEYSET_START = -(2**63)


def check_embedding(embedding: np.ndarray, dim: int) -> np.ndarray:
    vec = np.ascontiguousarray(np.asarray(embedding, dtype=np.float32).reshape(-1))
    if vec.shape != (dim,):
        raise ValueError(f"embedding has {vec.size} values, the store holds {dim}-d embeddings")
    if not np.all(np.isfinite(vec)):
        raise ValueError("embedding contains NaN or infinite values")
    return vec


class SQLiteIdentityStore:
    """`IdentityStore` on one SQLite file in WAL mode, with a change feed like the PostgreSQL store's.

    WAL lets readers (list/get) proceed while a write commits; `synchronous=FULL` makes each commit durable
    before `add`/`delete` returns. One connection guarded by a lock: SQLite serialises writers anyway, and the
    calls are short, so a pool would add complexity without throughput. Every write appends (seq, key, op)
    to `identity_changes` in its own transaction; `BEGIN IMMEDIATE` serialises writers, so sequence numbers
    are in commit order. The feed lets a gallery snapshot catch up with the writes made after it was saved.
    """

    shared_by_replicas = False  # one server process per file: its gallery sees its own writes

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
            # Erasure: freed cells and pages are overwritten with zeros, so a deleted (or replaced) vector
            # leaves no bytes in the file; `_erase_wal` then clears the older page copies from the WAL.
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open identity store {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        self._check_dim()
        self._store_id = self._ensure_store_id()

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

    def _ensure_store_id(self) -> str:
        with self._lock:
            # OR IGNORE: two processes opening a new file at once agree on whichever id landed first.
            self._db.execute(
                "INSERT OR IGNORE INTO store_info (k, v) VALUES ('store_id', ?)", (uuid.uuid4().hex,)
            )
            return str(self._db.execute("SELECT v FROM store_info WHERE k = 'store_id'").fetchone()[0])

    def store_id(self) -> str:
        return self._store_id

    def _log_change(self, key: int, op: str) -> None:
        self._db.execute("INSERT INTO identity_changes (key, op) VALUES (?, ?)", (key, op))

    def _keep_images(self, key: int, images: list[bytes] | None) -> None:
        # Images kept from an earlier enrollment belong to the template being replaced: never keep those.
        self._db.execute("DELETE FROM identity_images WHERE key = ?", (key,))
        if images:
            self._db.executemany(
                "INSERT INTO identity_images (key, idx, image) VALUES (?, ?, ?)",
                [(key, i, bytes(image)) for i, image in enumerate(images)],
            )

    def count_with_images_by_model(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT model_id, COUNT(*) FROM identities WHERE key IN (SELECT key FROM identity_images) "
                "GROUP BY model_id"
            ).fetchall()
        return {str(m): int(n) for m, n in rows}

    def images_of(self, keys: list[int]) -> dict[int, list[bytes]]:
        if not keys:
            return {}
        wanted = sorted({int(k) for k in keys})
        marks = ",".join("?" * len(wanted))
        with self._lock:
            rows = self._db.execute(
                f"SELECT key, image FROM identity_images WHERE key IN ({marks}) ORDER BY key, idx", wanted
            ).fetchall()
        out: dict[int, list[bytes]] = {}
        for key, image in rows:
            out.setdefault(int(key), []).append(bytes(image))
        return out

    def reembed(self, from_model: str, to_model: str, templates: dict[int, np.ndarray]) -> list[int]:
        rows = [
            (check_embedding(v, self.dim).tobytes(), to_model, int(k), from_model)
            for k, v in templates.items()
        ]
        updated: list[int] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for blob, model, key, old in rows:
                    cur = self._db.execute(
                        "UPDATE identities SET embedding = ?, model_id = ? WHERE key = ? AND model_id = ?",
                        (blob, model, key, old),
                    )
                    if cur.rowcount:
                        self._log_change(key, "u")
                        updated.append(key)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return updated

    def _erase_wal(self) -> None:
        """Copy the WAL into the file and truncate it to zero bytes: the WAL still holds the page images
        written before a delete or replace, vector included. Costs one checkpoint (~1 ms at small sizes)."""
        busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            # A reader in another process holds an older snapshot; the next checkpoint finishes the job.
            log.warning(
                "identity store %s: WAL checkpoint blocked by a reader; erased on the next one", self.path
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
        images: list[bytes] | None = None,
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
                self._keep_images(key, images)
                self._log_change(key, "u")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if existing is not None:
                self._erase_wal()  # the replaced vector's page images
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
                    self._db.execute("DELETE FROM identity_images WHERE key = ?", (row[0],))
                    self._log_change(int(row[0]), "d")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if row is not None:
                self._erase_wal()
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
        last = KEYSET_START
        while True:
            with self._lock:
                query = f"SELECT {_COLUMNS} FROM identities WHERE key > ? ORDER BY key LIMIT ?"
                rows = self._db.execute(query, (last, batch_size)).fetchall()
            if not rows:
                return
            batch = [self._row(r) for r in rows]
            last = batch[-1].key
            yield batch

    def names_by_key(self, model_id: str | None = None) -> dict[int, str]:
        with self._lock:
            if model_id is None:
                return dict(self._db.execute("SELECT key, name FROM identities"))
            return dict(self._db.execute("SELECT key, name FROM identities WHERE model_id = ?", (model_id,)))

    def count_by_model(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT model_id, COUNT(*) FROM identities GROUP BY model_id").fetchall()
        return {str(m): int(n) for m, n in rows}

    def model_history(self) -> ModelHistory:
        with self._lock:
            rows = self._db.execute(
                "SELECT k, v FROM store_info WHERE k = 'served_model_id' OR k LIKE 'fingerprint:%'"
            ).fetchall()
        return ModelHistory.from_rows(rows)

    def record_served_model(self, model: ServedModel) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for k, v in model.info_rows():
                    self._db.execute(
                        "INSERT INTO store_info (k, v) VALUES (?, ?) "
                        "ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                        (k, v),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def change_cursor(self) -> int:
        """The newest change sequence number (0 before the first write); see `PostgresIdentityStore`."""
        with self._lock:
            # Pruning may have emptied the table: never report a cursor below what was pruned.
            row = self._db.execute(
                "SELECT max(coalesce((SELECT max(seq) FROM identity_changes), 0), "
                "coalesce((SELECT CAST(v AS INTEGER) FROM store_info WHERE k = 'pruned_through'), 0))"
            ).fetchone()
        return int(row[0])

    def changes_since(self, cursor: int, limit: int = 10_000) -> ChangeBatch:
        """Net changes after `cursor` (at most `limit` change rows): current records of keys added or
        replaced that still exist, and keys deleted. Raises `StoreError` if the feed was pruned past it."""
        with self._lock:
            # One read transaction, so the change rows and the identity rows are the same snapshot.
            self._db.execute("BEGIN")
            try:
                pruned = self._db.execute("SELECT v FROM store_info WHERE k = 'pruned_through'").fetchone()
                if pruned is not None and cursor < int(pruned[0]):
                    raise StoreError(
                        f"change feed of {self.path} was pruned through {pruned[0]}, past cursor {cursor}: "
                        "rebuild the index from the store"
                    )
                changes = self._db.execute(
                    "SELECT seq, key FROM identity_changes WHERE seq > ? ORDER BY seq LIMIT ?",
                    (cursor, limit),
                ).fetchall()
                touched = sorted({int(key) for _, key in changes})
                marks = ",".join("?" * len(touched))
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM identities WHERE key IN ({marks})", touched
                ).fetchall()
            finally:
                self._db.execute("COMMIT")
        return ChangeBatch.net(cursor, changes, [self._row(r) for r in rows])

    def prune_changes(self, keep_last: int = 100_000) -> int:
        """Drop all but the newest `keep_last` change rows; returns how many were dropped.

        A snapshot or index whose cursor is older than what was pruned can no longer catch up from the feed
        (`changes_since` raises `StoreError`) and must be rebuilt from the identities.
        """
        if keep_last < 0:
            raise ValueError("keep_last must be >= 0")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT coalesce(max(seq), 0) - ? FROM identity_changes", (keep_last,))
                through = int(row.fetchone()[0])
                dropped = 0
                if through > 0:
                    dropped = self._db.execute(
                        "DELETE FROM identity_changes WHERE seq <= ?", (through,)
                    ).rowcount
                    self._db.execute(
                        "INSERT INTO store_info (k, v) VALUES ('pruned_through', ?) "
                        "ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                        (str(through),),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(dropped)

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
