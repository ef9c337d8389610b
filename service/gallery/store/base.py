"""The identity store's contract, and the logic every SQL backend shares, written once.

The gallery keeps its search index in memory; the store is the source of truth it is rebuilt from at start-up.
Every write is committed before the call returns, so an identity whose enrollment was acknowledged survives a
restart, a crash or `kill -9`, and a write that was not acknowledged is either fully present or absent.

Every write also appends (seq, key, op) to a change feed in the same transaction, so an index built at one
cursor (at start-up, or saved in a gallery snapshot) can be brought up to date with the writes after it, and
every server process sharing a store follows the writes of the others (`service.gallery.follower`).

`SqlIdentityStore` holds the queries the backends have in common (reads, model history, kept images, the
change feed, re-embedding); a backend (`sqlite.py`, `postgres.py`) supplies its connection, its transactions,
how a row becomes a record, and the few statements whose SQL differs.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np


class StoreError(Exception):
    """The store cannot be opened or used (bad URL, unreadable file, wrong embedding dimension)."""


class FeedPrunedError(StoreError):
    """The change feed no longer reaches back to a cursor: an index at that cursor must be rebuilt."""


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


class ChangeWaiter(Protocol):
    """How a follower sleeps between polls of the change feed: until a change may have landed, or timeout."""

    def wait(self, timeout_s: float) -> None: ...

    def wake(self) -> None:
        """Make a `wait` in progress (in another thread) return now."""

    def close(self) -> None: ...


@runtime_checkable
class IdentityStore(Protocol):
    """What the gallery needs from durable storage. Implementations must be safe to call from several threads.

    Names are unique; `add` with an existing name raises `IdentityExistsError` unless `replace=True`, which
    overwrites embedding, image count, model id, metadata and created_at but keeps the key.
    """

    dim: int
    where: str  # the store named for messages: a file path, or a URL without credentials

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


@runtime_checkable
class ChangeFeedStore(Protocol):
    """A store that logs every write as (seq, key, op) in the same transaction. `transient_errors` are the
    driver errors a follower waits out (a database restart) rather than treats as a bug."""

    transient_errors: tuple[type[Exception], ...]

    def change_cursor(self) -> int:
        """Sequence number of the newest change; follow changes after it to keep an index in sync. Take it
        BEFORE `iter_all` when (re)building an index: a change landing in between is applied twice, which is
        harmless (upsert and delete are idempotent), whereas taking it after could miss one."""

    def changes_since(self, cursor: int, limit: int = 10_000) -> ChangeBatch:
        """Net changes after `cursor`; raises `FeedPrunedError` if the feed was pruned past it."""

    def prune_changes(self, keep_last: int = 100_000, *, not_past: int | None = None) -> int:
        """Drop all but the newest `keep_last` change rows, and none after change `not_past` (a cursor that
        must stay reachable); returns how many were dropped."""

    def change_waiter(self) -> ChangeWaiter:
        """What a follower of this store's feed sleeps on between polls."""


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


class PollingWaiter:
    """A `ChangeWaiter` for a store that cannot announce changes: sleep the poll interval (or until woken)."""

    def __init__(self) -> None:
        self._woken = threading.Event()

    def wait(self, timeout_s: float) -> None:
        self._woken.wait(timeout_s)
        self._woken.clear()

    def wake(self) -> None:
        self._woken.set()

    def close(self) -> None:
        self._woken.set()


class SqlIdentityStore(ABC):
    """`IdentityStore` and `ChangeFeedStore` over one SQL connection guarded by a lock (store calls are short
    and rare next to searches, which never reach the database).

    Queries are written with `?` placeholders; `_sql` turns them into the driver's. The tables are
    `identities` (`_COLUMNS`), `identity_images`, `identity_changes` and a key/value table `_INFO`.
    """

    _INFO: ClassVar[str]  # the key/value table: dim, store id, served model, fingerprints, pruned_through
    _COLUMNS: ClassVar[str]  # identity columns, in the order `_record` reads them
    transient_errors: ClassVar[tuple[type[Exception], ...]]
    # Whether DELETE still erases a vector's bytes while other server processes hold the store open (the
    # erasure guarantee of docs/service.md, Privacy); `idembed-serve serve --processes N` needs it.
    erases_with_other_processes: ClassVar[bool]

    dim: int
    where: str
    _db: Any  # a DB-API connection whose execute(sql, params) returns a cursor
    _lock: threading.Lock
    _store_id: str

    # --- supplied by a backend -------------------------------------------------------------------------

    @abstractmethod
    def _record(self, row: tuple[Any, ...]) -> EnrolledIdentity:
        """An identity from one row of `_COLUMNS`."""

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[None]:
        """A write transaction, serialised against every other writer of the store (so change sequence
        numbers are in commit order). Called with `_lock` held."""

    @abstractmethod
    def _vector(self, vec: np.ndarray) -> object:
        """The parameter value that stores an embedding."""

    @abstractmethod
    def _keys_in(self, keys: list[int]) -> tuple[str, tuple[Any, ...]]:
        """A `key` condition matching these keys, and its parameters."""

    @abstractmethod
    def _erase_deleted(self) -> None:
        """Leave no bytes of a deleted or replaced vector behind (called after such a write commits)."""

    def _sql(self, query: str) -> str:
        return query

    # --- shared -------------------------------------------------------------------------------------------

    def _run(self, query: str, params: tuple[Any, ...] | list[Any] = ()) -> Any:
        return self._db.execute(self._sql(query), tuple(params))

    @contextmanager
    def _write(self) -> Iterator[None]:
        with self._lock, self._transaction():
            yield

    def _check_dim(self) -> None:
        with self._write():
            row = self._run(f"SELECT v FROM {self._INFO} WHERE k = 'dim'").fetchone()
            if row is None:
                self._run(f"INSERT INTO {self._INFO} (k, v) VALUES ('dim', ?)", (str(self.dim),))
                return
        if int(row[0]) != self.dim:
            raise StoreError(
                f"identity store {self.where} holds {row[0]}-d embeddings but the model produces "
                f"{self.dim}-d; use another store (IDEMBED_STORE_URL) or re-enroll with the new model"
            )

    def _ensure_store_id(self, new_id: str) -> str:
        with self._write():
            # Two processes creating the store at once agree on whichever id landed first.
            self._run(
                f"INSERT INTO {self._INFO} (k, v) VALUES ('store_id', ?) ON CONFLICT (k) DO NOTHING",
                (new_id,),
            )
            row = self._run(f"SELECT v FROM {self._INFO} WHERE k = 'store_id'").fetchone()
        return str(row[0])

    def store_id(self) -> str:
        return self._store_id

    def _log_change(self, key: int, op: str) -> None:
        self._run("INSERT INTO identity_changes (key, op) VALUES (?, ?)", (key, op))

    def _keep_images(self, key: int, images: list[bytes] | None) -> None:
        # Images kept from an earlier enrollment belong to the template being replaced: never keep those.
        self._run("DELETE FROM identity_images WHERE key = ?", (key,))
        for i, image in enumerate(images or ()):
            row = (key, i, bytes(image))
            self._run("INSERT INTO identity_images (key, idx, image) VALUES (?, ?, ?)", row)

    def _set_info(self, k: str, v: str) -> None:
        self._run(
            f"INSERT INTO {self._INFO} (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            (k, v),
        )

    def get(self, name: str) -> EnrolledIdentity | None:
        with self._lock:
            row = self._run(f"SELECT {self._COLUMNS} FROM identities WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._record(row)

    def _records_of(self, keys: list[int]) -> list[EnrolledIdentity]:
        """Call with `_lock` held."""
        if not keys:
            return []
        where, params = self._keys_in(sorted({int(k) for k in keys}))
        rows = self._run(f"SELECT {self._COLUMNS} FROM identities WHERE {where}", params).fetchall()
        return [self._record(r) for r in rows]

    def get_by_keys(self, keys: list[int]) -> dict[int, EnrolledIdentity]:
        with self._lock:
            records = self._records_of(keys)
        return {r.key: r for r in records}

    def delete(self, name: str) -> EnrolledIdentity | None:
        with self._write():
            row = self._run(f"SELECT {self._COLUMNS} FROM identities WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            record = self._record(row)
            self._run("DELETE FROM identity_images WHERE key = ?", (record.key,))
            self._run("DELETE FROM identities WHERE key = ?", (record.key,))
            self._log_change(record.key, "d")
        self._erase_deleted()
        return record

    def list(self, *, offset: int = 0, limit: int = 100) -> list[EnrolledIdentity]:
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must be >= 0")
        query = f"SELECT {self._COLUMNS} FROM identities ORDER BY key LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._run(query, (limit, offset)).fetchall()
        return [self._record(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._run("SELECT count(*) FROM identities").fetchone()[0])

    def iter_all(self, batch_size: int = 10_000) -> Iterator[list[EnrolledIdentity]]:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        last = KEYSET_START  # keyset pagination: O(batch) per page at any table size, unlike OFFSET
        query = f"SELECT {self._COLUMNS} FROM identities WHERE key > ? ORDER BY key LIMIT ?"
        while True:
            with self._lock:
                rows = self._run(query, (last, batch_size)).fetchall()
            if not rows:
                return
            batch = [self._record(r) for r in rows]
            last = batch[-1].key
            yield batch

    def names_by_key(self, model_id: str | None = None) -> dict[int, str]:
        with self._lock:
            if model_id is None:
                rows = self._run("SELECT key, name FROM identities").fetchall()
            else:
                query = "SELECT key, name FROM identities WHERE model_id = ?"
                rows = self._run(query, (model_id,)).fetchall()
        return {int(key): str(name) for key, name in rows}

    def _count_models(self, where: str = "") -> dict[str, int]:
        with self._lock:
            query = f"SELECT model_id, count(*) FROM identities i {where} GROUP BY model_id"
            rows = self._run(query).fetchall()
        return {str(m): int(n) for m, n in rows}

    def count_by_model(self) -> dict[str, int]:
        return self._count_models()

    def count_with_images_by_model(self) -> dict[str, int]:
        return self._count_models("WHERE EXISTS (SELECT 1 FROM identity_images m WHERE m.key = i.key)")

    def model_history(self) -> ModelHistory:
        with self._lock:
            rows = self._run(
                f"SELECT k, v FROM {self._INFO} WHERE k = 'served_model_id' OR k LIKE 'fingerprint:%'"
            ).fetchall()
        return ModelHistory.from_rows(rows)

    def record_served_model(self, model: ServedModel) -> None:
        with self._write():
            for k, v in model.info_rows():
                self._set_info(k, v)

    def images_of(self, keys: list[int]) -> dict[int, list[bytes]]:
        if not keys:
            return {}
        where, params = self._keys_in(sorted({int(k) for k in keys}))
        with self._lock:
            rows = self._run(
                f"SELECT key, image FROM identity_images WHERE {where} ORDER BY key, idx", params
            ).fetchall()
        out: dict[int, list[bytes]] = {}
        for key, image in rows:
            out.setdefault(int(key), []).append(bytes(image))
        return out

    def reembed(self, from_model: str, to_model: str, templates: dict[int, np.ndarray]) -> list[int]:
        rows = [(self._vector(check_embedding(v, self.dim)), int(k)) for k, v in templates.items()]
        updated: list[int] = []
        with self._write():
            for vector, key in rows:
                cur = self._run(
                    "UPDATE identities SET embedding = ?, model_id = ? WHERE key = ? AND model_id = ?",
                    (vector, to_model, key, from_model),
                )
                if cur.rowcount:
                    self._log_change(key, "u")
                    updated.append(key)
        return updated

    def change_cursor(self) -> int:
        with self._lock:
            # Pruning may have emptied the table: never report a cursor below what was pruned.
            newest, pruned = self._run(
                "SELECT (SELECT coalesce(max(seq), 0) FROM identity_changes), "
                f"(SELECT coalesce(max(CAST(v AS BIGINT)), 0) FROM {self._INFO} WHERE k = 'pruned_through')"
            ).fetchone()
        return max(int(newest), int(pruned))

    def _read_snapshot(self) -> AbstractContextManager[None]:
        """A read transaction: the change rows and the identity rows of `changes_since` are one snapshot."""
        return self._transaction()

    def changes_since(self, cursor: int, limit: int = 10_000) -> ChangeBatch:
        """Net changes after `cursor` (at most `limit` change rows): current records of keys added or
        replaced that still exist, and keys deleted. `FeedPrunedError` if the feed was pruned past it."""
        with self._lock, self._read_snapshot():
            pruned = self._run(f"SELECT v FROM {self._INFO} WHERE k = 'pruned_through'").fetchone()
            if pruned is not None and cursor < int(pruned[0]):
                raise FeedPrunedError(
                    f"the change feed of {self.where} was pruned through {pruned[0]}, past cursor {cursor} "
                    "(IDEMBED_CHANGE_FEED_KEEP): the index must be rebuilt from the store"
                )
            changes = self._run(
                "SELECT seq, key FROM identity_changes WHERE seq > ? ORDER BY seq LIMIT ?", (cursor, limit)
            ).fetchall()
            current = self._records_of([key for _, key in changes])
        return ChangeBatch.net(cursor, [(int(s), int(k)) for s, k in changes], current)

    def prune_changes(self, keep_last: int = 100_000, *, not_past: int | None = None) -> int:
        """Drop all but the newest `keep_last` change rows, and none after change `not_past` (a cursor that
        must stay reachable); returns how many were dropped.

        An index whose cursor is older than what was pruned can no longer catch up from the feed
        (`changes_since` raises `FeedPrunedError`) and must be rebuilt from the identities.
        """
        if keep_last < 0:
            raise ValueError("keep_last must be >= 0")
        with self._write():
            row = self._run("SELECT coalesce(max(seq), 0) - ? FROM identity_changes", (keep_last,)).fetchone()
            through = int(row[0]) if not_past is None else min(int(row[0]), int(not_past))
            if through <= 0:
                return 0
            dropped = self._run("DELETE FROM identity_changes WHERE seq <= ?", (through,)).rowcount
            self._set_info("pruned_through", str(through))
        return int(dropped)

    def change_waiter(self) -> ChangeWaiter:
        return PollingWaiter()

    def close(self) -> None:
        with self._lock:
            self._db.close()
