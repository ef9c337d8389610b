"""`IdentityStore` on PostgreSQL + pgvector: one store shared by several service replicas, with a change feed.

Each replica keeps its own in-memory index (exact or HNSW) and follows the store's change feed to stay in
sync (`service.gallery.follower`), rather than sending every identify query to pgvector: measured on the same
machine at 100k x 128-d and equal recall, a local HNSW search was 3-7x faster than a pgvector HNSW query over
a connection, and it puts no database round trip on the hot path (docs/performance.md, "PostgreSQL").

Change feed: writers take an exclusive lock on `identity_changes` first, so sequence numbers become visible in
commit order and a follower polling `seq > cursor` can never skip a change that commits late. Enrollment is
rare compared with search, so serialising writers costs nothing that matters. A NOTIFY on each commit lets
followers wake immediately instead of waiting for the next poll (`NotifyWaiter`).

Imported only when a `postgresql://` store is opened (`open_store`), so the default install needs no driver.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb

from service.gallery.store.base import (
    ChangeWaiter,
    EnrolledIdentity,
    IdentityExistsError,
    SqlIdentityStore,
    StoreError,
    check_embedding,
)

NOTIFY_CHANNEL = "idembed_identity_changes"

log = logging.getLogger(__name__)


def _schema(dim: int) -> list[str]:
    return [
        "CREATE EXTENSION IF NOT EXISTS vector",
        "CREATE TABLE IF NOT EXISTS idembed_store_info (k text PRIMARY KEY, v text NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS identities (
            key         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name        text NOT NULL UNIQUE,
            embedding   vector({dim}) NOT NULL,
            image_count integer NOT NULL CHECK (image_count >= 0),
            model_id    text NOT NULL,
            metadata    jsonb NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        )""",
        """CREATE TABLE IF NOT EXISTS identity_changes (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            key bigint NOT NULL,
            op  char(1) NOT NULL CHECK (op IN ('u', 'd'))
        )""",
        """CREATE TABLE IF NOT EXISTS identity_images (
            key   bigint NOT NULL REFERENCES identities (key) ON DELETE CASCADE,
            idx   integer NOT NULL,
            image bytea NOT NULL,
            PRIMARY KEY (key, idx)
        )""",
    ]


def safe_url(url: str) -> str:
    """The URL without credentials, for error messages."""
    return url.split("@")[-1]


class PostgresIdentityStore(SqlIdentityStore):
    """`IdentityStore` on PostgreSQL with the pgvector extension (`embedding vector(dim)`).

    The connecting role must be allowed to `CREATE EXTENSION vector` the first time (or an administrator
    creates it beforehand).
    """

    _INFO = "idembed_store_info"
    _COLUMNS = "key, name, embedding, image_count, model_id, metadata, created_at"
    transient_errors = (psycopg.Error,)  # a restart or failover: the follower retries
    erases_with_other_processes = True  # DELETE + VACUUM FULL; see its erasure limits in docs/service.md

    def __init__(self, url: str, dim: int, *, connect_timeout_s: float = 10.0) -> None:
        self.url = url
        self.where = safe_url(url)
        self.dim = int(dim)
        if self.dim < 1:
            raise StoreError(f"store {self.where}: embedding dim must be >= 1, got {dim}")
        self._lock = threading.Lock()
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=int(connect_timeout_s))
            with self._db.transaction():
                # Serialise concurrent first start-ups of several replicas on an empty database.
                self._db.execute("SELECT pg_advisory_xact_lock(hashtext('idembed_schema'))")
                for statement in _schema(self.dim):
                    self._db.execute(statement)
            register_vector(self._db)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open PostgreSQL identity store {self.where}: {exc}") from exc
        self._check_dim()
        self._store_id = self._ensure_store_id(uuid.uuid4().hex)

    def _sql(self, query: str) -> str:
        return query.replace("%", "%%").replace("?", "%s")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._db.transaction():
            # See the module docstring: makes change sequence numbers visible in commit order.
            self._db.execute("LOCK TABLE identity_changes IN EXCLUSIVE MODE")
            yield

    @contextmanager
    def _read_snapshot(self) -> Iterator[None]:
        with self._db.transaction():
            yield

    def _vector(self, vec: np.ndarray) -> object:
        return vec

    def _keys_in(self, keys: list[int]) -> tuple[str, tuple[Any, ...]]:
        return "key = ANY(?)", (keys,)

    def _log_change(self, key: int, op: str) -> None:
        super()._log_change(key, op)
        self._db.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))

    def _erase_deleted(self) -> None:
        """Rewrite the identities table so no dead row version (a deleted or replaced vector) stays in it.

        A DELETE only marks the row dead; plain VACUUM frees the space but leaves the bytes where nothing
        was moved over them (a page's most recently written row, measured), so only VACUUM FULL, which
        writes a new table file and drops the old one, leaves no byte of the vector in the table. It holds an
        exclusive lock while it copies the live rows (docs/service.md, Privacy: cost and what it cannot
        reach: WAL segments, backups, freed filesystem blocks).
        """
        with self._lock:
            self._db.execute("VACUUM FULL identities")

    @staticmethod
    def _record(row: tuple[Any, ...]) -> EnrolledIdentity:
        key, name, embedding, image_count, model_id, metadata, created_at = row
        return EnrolledIdentity(
            key=int(key),
            name=name,
            # pgvector's loader returns its own Vector type (float32 values) rather than an ndarray.
            embedding=np.asarray(embedding.to_numpy(), dtype=np.float32),
            image_count=int(image_count),
            model_id=model_id,
            metadata=dict(metadata),
            created_at=created_at,
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
        values = (vec, int(image_count), model_id, Jsonb(dict(metadata or {})), datetime.now(UTC))
        with self._write():
            existing = self._db.execute(
                "SELECT key FROM identities WHERE name = %s FOR UPDATE", (name,)
            ).fetchone()
            if existing is not None and not replace:
                raise IdentityExistsError(name)
            if existing is None:
                row = self._db.execute(
                    "INSERT INTO identities (name, embedding, image_count, model_id, metadata, created_at) "
                    f"VALUES (%s, %s, %s, %s, %s, %s) RETURNING {self._COLUMNS}",
                    (name, *values),
                ).fetchone()
            else:
                row = self._db.execute(
                    "UPDATE identities SET embedding = %s, image_count = %s, model_id = %s, metadata = %s, "
                    f"created_at = %s WHERE key = %s RETURNING {self._COLUMNS}",
                    (*values, existing[0]),
                ).fetchone()
            assert row is not None
            record = self._record(row)
            self._keep_images(record.key, images)
            self._log_change(record.key, "u")
        if existing is not None:
            self._erase_deleted()  # the replaced vector's old row version
        return record, existing is not None

    def change_waiter(self) -> ChangeWaiter:
        return NotifyWaiter(self.url)


class NotifyWaiter:
    """Sleeps on LISTEN until any replica's write NOTIFYs (or the poll interval passes); a lost notification
    only delays a change until the next poll. A dropped connection is reopened at the next wait."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._listener: psycopg.Connection[Any] | None = None
        self._closed = threading.Event()
        self._listen()

    def _listen(self) -> None:
        try:
            self._listener = psycopg.connect(self._url, autocommit=True)
            self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except psycopg.Error as exc:
            self._listener = None
            log.warning("cannot open the change-feed listener of %s: %s", safe_url(self._url), exc)

    def wait(self, timeout_s: float) -> None:
        if self._listener is None:
            self._closed.wait(timeout_s)  # polling until the listener can be reopened
            if not self._closed.is_set():
                self._listen()
            return
        try:
            for _ in self._listener.notifies(timeout=timeout_s, stop_after=1):
                pass
        except psycopg.Error as exc:
            log.warning("change-feed listener of %s lost, reopening: %s", safe_url(self._url), exc)
            self._listener.close()
            self._listener = None

    def wake(self) -> None:
        # Wake the listener now rather than after a poll interval; other followers just re-poll once.
        try:
            with psycopg.connect(self._url, autocommit=True) as conn:
                conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
        except psycopg.Error as exc:
            log.warning("cannot wake the change-feed listener, waiting for its poll: %s", exc)

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
