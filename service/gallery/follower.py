"""Keeps an in-memory index in step with a shared store: a background thread applying the change feed.

Every server process serving one store (PostgreSQL replicas, or several processes on one SQLite file) writes
it and follows the writes of the others. The follower polls `changes_since(cursor)`, woken early by the
store's `ChangeWaiter` (PostgreSQL NOTIFY; SQLite polls), and hands each batch to `apply`.

A follower whose cursor the feed no longer reaches (the feed was pruned past it, IDEMBED_CHANGE_FEED_KEEP)
cannot catch up: its index may miss writes. It then says so in `problem` (the service's readiness fails with
that reason), rebuilds the index from the store with `rebuild` and carries on from the cursor it returns,
after which `problem` is None again. Driver errors the store calls transient (a database restart) are
retried after a poll interval; the index keeps serving meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from service.gallery.store import ChangeBatch, ChangeFeedStore, FeedPrunedError

log = logging.getLogger("idembed.gallery.follower")

DEFAULT_POLL_S = 1.0


class ChangeFollower:
    """`apply(batch)` indexes `batch.upserts` and drops `batch.deleted`; `rebuild()` rebuilds the index from
    the store and returns the change cursor it reflects (taken before reading the store)."""

    def __init__(
        self,
        store: ChangeFeedStore,
        apply: Callable[[ChangeBatch], None],
        *,
        cursor: int,
        rebuild: Callable[[], int] | None = None,
        poll_interval_s: float = DEFAULT_POLL_S,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self.store = store
        self.cursor = int(cursor)
        self.problem: str | None = None  # why the index cannot catch up with the store (None: it can)
        self.rebuilds = 0
        self._apply = apply
        self._rebuild = rebuild
        self._poll = float(poll_interval_s)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one round at a time: the thread's, or a caller's `poll`
        self._waiter = store.change_waiter()
        self._thread = threading.Thread(target=self._run, name="idembed-change-follower", daemon=True)

    def start(self) -> ChangeFollower:
        self._thread.start()
        return self

    def sync_once(self) -> int:
        """Apply every pending change now; returns how many identities were upserted or deleted. Raises
        `FeedPrunedError` when the feed no longer reaches the cursor."""
        with self._lock:
            return self._sync()

    def _sync(self) -> int:
        applied = 0
        while True:
            batch = self.store.changes_since(self.cursor)
            if batch.cursor == self.cursor:
                return applied
            self._apply(batch)
            applied += len(batch.upserts) + len(batch.deleted)
            self.cursor = batch.cursor

    def poll(self) -> None:
        """One round: catch up with the feed, or, when it cannot, rebuild from the store."""
        with self._lock:
            self._poll_once()

    def _poll_once(self) -> None:
        try:
            self._sync()
        except FeedPrunedError as exc:
            if self.problem is None:
                log.error("index fell behind the store's change feed, rebuilding it from the store: %s", exc)
            self.problem = f"the gallery index is being rebuilt from the store: {exc}"
        if self.problem is not None and self._rebuild is not None:
            self.cursor = self._rebuild()
            self.rebuilds += 1
            self.problem = None
            log.info("gallery index rebuilt from the store", extra={"cursor": self.cursor})
            self._sync()  # writes made while it was rebuilt

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except self.store.transient_errors as exc:
                # Keep serving from the current index; retry after a poll interval (restart, failover).
                log.warning("identity change feed unavailable, retrying in %.1fs: %s", self._poll, exc)
            except Exception as exc:
                # Not a known condition: fail readiness (never serve a silently stale index) and rebuild
                # at the next round.
                log.exception("following the identity change feed failed")
                self.problem = f"following the store's change feed failed: {exc!r}"
            if not self._stop.is_set():
                self._waiter.wait(self._poll)

    def wake(self) -> None:
        """Poll now instead of at the end of the interval."""
        self._waiter.wake()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._waiter.wake()
            self._thread.join(timeout=self._poll + 5)
        self._waiter.close()
