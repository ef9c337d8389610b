"""`IdentityStore` on PostgreSQL + pgvector: one store shared by several service replicas, with a change feed.

Each replica keeps its own in-memory index (exact or HNSW) and follows the store's change feed to stay in
sync, rather than sending every identify query to pgvector: measured on the same machine at 100k x 128-d
and equal recall, a local HNSW search was 3-7x faster than a pgvector HNSW query over a connection, and it
puts no database round trip on the hot path (docs/performance.md, "PostgreSQL").

Change feed: every add/replace/delete appends a row (seq, key, op) to `identity_changes` in the same
transaction. Writers take an exclusive lock on that table first, so sequence numbers become visible in commit
order and a follower polling `seq > cursor` can never skip a change that commits late. Enrollment is rare
compared with search, so serialising writers costs nothing that matters. A NOTIFY on each commit lets
followers wake immediately instead of waiting for the next poll.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb

from service.gallery.store import (
    KEYSET_START,
    ChangeBatch,
    EnrolledIdentity,
    IdentityExistsError,
    ModelHistory,
    ServedModel,
    StoreError,
    check_embedding,
)

NOTIFY_CHANNEL = "idembed_identity_changes"

log = logging.getLogger(__name__)

_COLUMNS = "key, name, embedding, image_count, model_id, metadata, created_at"


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


def _safe_url(url: str) -> str:
    """The URL without credentials, for error messages."""
    return url.split("@")[-1]


class PostgresIdentityStore:
    """`IdentityStore` on PostgreSQL with the pgvector extension (`embedding vector(dim)`).

    One connection guarded by a lock, like the SQLite store: store calls are short and rare next to searches,
    which never reach the database. The connecting role must be allowed to `CREATE EXTENSION vector` the
    first time (or an administrator creates it beforehand).
    """

    shared_by_replicas = True  # every replica follows the change feed (`ChangeFollower`)

    def __init__(self, url: str, dim: int, *, connect_timeout_s: float = 10.0) -> None:
        self.url = url
        self.dim = int(dim)
        if self.dim < 1:
            raise StoreError(f"store {_safe_url(url)}: embedding dim must be >= 1, got {dim}")
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
            raise StoreError(f"cannot open PostgreSQL identity store {_safe_url(url)}: {exc}") from exc
        self._check_dim()
        self._store_id = self._ensure_store_id()

    def _ensure_store_id(self) -> str:
        with self._lock, self._db.transaction():
            self._db.execute(
                "INSERT INTO idembed_store_info (k, v) VALUES ('store_id', %s) ON CONFLICT (k) DO NOTHING",
                (uuid.uuid4().hex,),
            )
            row = self._db.execute("SELECT v FROM idembed_store_info WHERE k = 'store_id'").fetchone()
        assert row is not None
        return str(row[0])

    def store_id(self) -> str:
        return self._store_id

    def _check_dim(self) -> None:
        with self._lock, self._db.transaction():
            row = self._db.execute("SELECT v FROM idembed_store_info WHERE k = 'dim'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO idembed_store_info (k, v) VALUES ('dim', %s)", (str(self.dim),))
                return
        if int(row[0]) != self.dim:
            raise StoreError(
                f"identity store {_safe_url(self.url)} holds {row[0]}-d embeddings but the model produces "
                f"{self.dim}-d; use another store (IDEMBED_STORE_URL) or re-enroll with the new model"
            )

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

    def _log_change(self, key: int, op: str) -> None:
        self._db.execute("INSERT INTO identity_changes (key, op) VALUES (%s, %s)", (key, op))
        self._db.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))

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
        meta = dict(metadata or {})
        with self._lock, self._db.transaction():
            # See the module docstring: makes change sequence numbers visible in commit order.
            self._db.execute("LOCK TABLE identity_changes IN EXCLUSIVE MODE")
            existing = self._db.execute(
                "SELECT key FROM identities WHERE name = %s FOR UPDATE", (name,)
            ).fetchone()
            if existing is not None and not replace:
                raise IdentityExistsError(name)
            if existing is None:
                row = self._db.execute(
                    "INSERT INTO identities (name, embedding, image_count, model_id, metadata) "
                    f"VALUES (%s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
                    (name, vec, int(image_count), model_id, Jsonb(meta)),
                ).fetchone()
            else:
                row = self._db.execute(
                    "UPDATE identities SET embedding = %s, image_count = %s, model_id = %s, metadata = %s, "
                    f"created_at = now() WHERE key = %s RETURNING {_COLUMNS}",
                    (vec, int(image_count), model_id, Jsonb(meta), existing[0]),
                ).fetchone()
            assert row is not None
            record = self._record(row)
            # Images kept from an earlier enrollment belong to the template being replaced: never keep those.
            self._db.execute("DELETE FROM identity_images WHERE key = %s", (record.key,))
            if images:
                with self._db.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO identity_images (key, idx, image) VALUES (%s, %s, %s)",
                        [(record.key, i, bytes(image)) for i, image in enumerate(images)],
                    )
            self._log_change(record.key, "u")
        if existing is not None:
            self._erase_dead_rows()  # the replaced vector's old row version
        return record, existing is not None

    def _erase_dead_rows(self) -> None:
        """Rewrite the identities table so no dead row version (a deleted or replaced vector) stays in it.

        A DELETE only marks the row dead; plain VACUUM frees the space but leaves the bytes where nothing
        was moved over them (a page's most recently written row, measured), so only VACUUM FULL, which
        writes a new table file and drops the old one, leaves no byte of the vector in the table. It holds an
        exclusive lock while it copies the live rows (docs/service.md, Privacy: cost and what it cannot
        reach: WAL segments, backups, freed filesystem blocks).
        """
        with self._lock:
            self._db.execute("VACUUM FULL identities")

    def get(self, name: str) -> EnrolledIdentity | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM identities WHERE name = %s", (name,)).fetchone()
        return None if row is None else self._record(row)

    def get_by_keys(self, keys: list[int]) -> dict[int, EnrolledIdentity]:
        if not keys:
            return {}
        wanted = sorted({int(k) for k in keys})
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM identities WHERE key = ANY(%s)", (wanted,)
            ).fetchall()
        return {r.key: r for r in map(self._record, rows)}

    def delete(self, name: str) -> EnrolledIdentity | None:
        with self._lock, self._db.transaction():
            self._db.execute("LOCK TABLE identity_changes IN EXCLUSIVE MODE")
            row = self._db.execute(
                f"DELETE FROM identities WHERE name = %s RETURNING {_COLUMNS}", (name,)
            ).fetchone()
            if row is None:
                return None
            record = self._record(row)
            self._log_change(record.key, "d")
        self._erase_dead_rows()
        return record

    def list(self, *, offset: int = 0, limit: int = 100) -> list[EnrolledIdentity]:
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must be >= 0")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM identities ORDER BY key LIMIT %s OFFSET %s", (limit, offset)
            ).fetchall()
        return [self._record(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM identities").fetchone()
        return int(row[0]) if row else 0

    def iter_all(self, batch_size: int = 10_000) -> Iterator[list[EnrolledIdentity]]:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        last = KEYSET_START  # keyset pagination: O(batch) per page at any table size, unlike OFFSET
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM identities WHERE key > %s ORDER BY key LIMIT %s",
                    (last, batch_size),
                ).fetchall()
            if not rows:
                return
            batch = [self._record(r) for r in rows]
            last = batch[-1].key
            yield batch

    def names_by_key(self, model_id: str | None = None) -> dict[int, str]:
        with self._lock:
            if model_id is None:
                rows = self._db.execute("SELECT key, name FROM identities").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT key, name FROM identities WHERE model_id = %s", (model_id,)
                ).fetchall()
        return {int(key): name for key, name in rows}

    def count_by_model(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT model_id, count(*) FROM identities GROUP BY model_id").fetchall()
        return {str(m): int(n) for m, n in rows}

    def model_history(self) -> ModelHistory:
        with self._lock:
            rows = self._db.execute(
                "SELECT k, v FROM idembed_store_info WHERE k = 'served_model_id' OR k LIKE 'fingerprint:%'"
            ).fetchall()
        return ModelHistory.from_rows(rows)

    def record_served_model(self, model: ServedModel) -> None:
        with self._lock, self._db.transaction():
            for k, v in model.info_rows():
                self._db.execute(
                    "INSERT INTO idembed_store_info (k, v) VALUES (%s, %s) "
                    "ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                    (k, v),
                )

    def count_with_images_by_model(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT model_id, count(*) FROM identities i "
                "WHERE EXISTS (SELECT 1 FROM identity_images m WHERE m.key = i.key) GROUP BY model_id"
            ).fetchall()
        return {str(m): int(n) for m, n in rows}

    def images_of(self, keys: list[int]) -> dict[int, list[bytes]]:
        if not keys:
            return {}
        wanted = sorted({int(k) for k in keys})
        with self._lock:
            rows = self._db.execute(
                "SELECT key, image FROM identity_images WHERE key = ANY(%s) ORDER BY key, idx", (wanted,)
            ).fetchall()
        out: dict[int, list[bytes]] = {}
        for key, image in rows:
            out.setdefault(int(key), []).append(bytes(image))
        return out

    def reembed(self, from_model: str, to_model: str, templates: dict[int, np.ndarray]) -> list[int]:
        rows = [(int(k), check_embedding(v, self.dim)) for k, v in templates.items()]
        updated: list[int] = []
        with self._lock, self._db.transaction():
            self._db.execute("LOCK TABLE identity_changes IN EXCLUSIVE MODE")
            for key, vec in rows:
                cur = self._db.execute(
                    "UPDATE identities SET embedding = %s, model_id = %s WHERE key = %s AND model_id = %s",
                    (vec, to_model, key, from_model),
                )
                if cur.rowcount:
                    self._log_change(key, "u")
                    updated.append(key)
        return updated

    def change_cursor(self) -> int:
        """The newest change sequence number; take it BEFORE `iter_all` when (re)building an index, then
        follow `changes_since(cursor)`: a change landing in between is applied twice, which is harmless
        (upsert and delete are idempotent), whereas taking it after could miss one."""
        with self._lock:
            # Pruning may have emptied the table: never report a cursor below what was pruned.
            row = self._db.execute(
                "SELECT greatest((SELECT coalesce(max(seq), 0) FROM identity_changes), "
                "(SELECT coalesce(max(v::bigint), 0) FROM idembed_store_info WHERE k = 'pruned_through'))"
            ).fetchone()
        return int(row[0]) if row else 0

    def changes_since(self, cursor: int, limit: int = 10_000) -> ChangeBatch:
        """Net changes after `cursor` (at most `limit` change rows).

        Returns the current records of keys added or replaced that still exist, and the keys deleted."""
        with self._lock:
            pruned = self._db.execute(
                "SELECT v FROM idembed_store_info WHERE k = 'pruned_through'"
            ).fetchone()
            if pruned is not None and cursor < int(pruned[0]):
                raise StoreError(
                    f"change feed of {_safe_url(self.url)} was pruned through {pruned[0]}, "
                    f"past cursor {cursor}: restart this replica to rebuild its index from the store"
                )
            changes = self._db.execute(
                "SELECT seq, key FROM identity_changes WHERE seq > %s ORDER BY seq LIMIT %s", (cursor, limit)
            ).fetchall()
            if not changes:
                return ChangeBatch(cursor, [], [])
            touched = sorted({int(key) for _, key in changes})
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM identities WHERE key = ANY(%s)", (touched,)
            ).fetchall()
        return ChangeBatch.net(cursor, changes, [self._record(r) for r in rows])

    def prune_changes(self, keep_last: int = 100_000) -> int:
        """Drop all but the newest `keep_last` change rows; returns how many were dropped.

        A follower whose cursor is older than what was pruned can no longer catch up from the feed:
        `changes_since` then raises `StoreError` and that replica must restart (rebuild from `iter_all`).
        """
        if keep_last < 0:
            raise ValueError("keep_last must be >= 0")
        with self._lock, self._db.transaction():
            self._db.execute("LOCK TABLE identity_changes IN EXCLUSIVE MODE")
            row = self._db.execute("SELECT coalesce(max(seq), 0) - %s FROM identity_changes", (keep_last,))
            through = int(row.fetchone()[0])  # type: ignore[index]
            if through <= 0:
                return 0
            cur = self._db.execute("DELETE FROM identity_changes WHERE seq <= %s", (through,))
            self._db.execute(
                "INSERT INTO idembed_store_info (k, v) VALUES ('pruned_through', %s) "
                "ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                (str(through),),
            )
        return int(cur.rowcount)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ChangeFollower:
    """Background thread that applies a store's change feed to a replica's in-memory index.

    `apply(batch)` is the gallery's hook (index `batch.upserts`, drop `batch.deleted`). It wakes on NOTIFY
    from any replica's write and also polls every `poll_interval_s`, so a lost notification only delays a
    change.
    """

    def __init__(
        self,
        store: PostgresIdentityStore,
        apply: Callable[[ChangeBatch], None],
        *,
        cursor: int,
        poll_interval_s: float = 1.0,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self.store = store
        self.cursor = int(cursor)
        self._apply = apply
        self._poll = float(poll_interval_s)
        self._stop = threading.Event()
        self._listener = psycopg.connect(store.url, autocommit=True)
        self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        self._thread = threading.Thread(target=self._run, name="idembed-pg-follower", daemon=True)

    def start(self) -> ChangeFollower:
        self._thread.start()
        return self

    def sync_once(self) -> int:
        """Apply every pending change now; returns how many identities were upserted or deleted."""
        applied = 0
        while True:
            batch = self.store.changes_since(self.cursor)
            if batch.cursor == self.cursor:
                return applied
            self._apply(batch)
            applied += len(batch.upserts) + len(batch.deleted)
            self.cursor = batch.cursor

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
                # Blocks until a NOTIFY arrives or the poll interval passes.
                for _ in self._listener.notifies(timeout=self._poll, stop_after=1):
                    pass
            except StoreError as exc:
                log.error("%s", exc)
                self._stop.wait(self._poll)
            except psycopg.Error as exc:
                # Keep serving from the current index; retry after a poll interval (restart, failover).
                log.warning("identity change feed unavailable, retrying in %.1fs: %s", self._poll, exc)
                self._stop.wait(self._poll)
                self._reconnect_listener()

    def _reconnect_listener(self) -> None:
        try:
            self._listener.close()
            self._listener = psycopg.connect(self.store.url, autocommit=True)
            self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except psycopg.Error as exc:
            log.warning("cannot re-open the change-feed listener: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            # Wake the listener now rather than after a poll interval; other followers just re-poll once.
            try:
                with psycopg.connect(self.store.url, autocommit=True) as conn:
                    conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
            except psycopg.Error as exc:
                log.warning("cannot wake the change-feed listener, waiting for its poll: %s", exc)
            self._thread.join(timeout=self._poll + 5)
        self._listener.close()
