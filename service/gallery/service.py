"""The gallery as the service runs it: opens the store, restores a snapshot (or rebuilds), follows the other
processes' writes, decides when to snapshot and prune, checks and carries out model changes (re-embedding),
and serves searches and enrollments with their store calls off the event loop.

It knows models only by what the store records of them (`ServedModel`) and by an `embed` callable that turns
an identity's kept images into the new model's template; loading models is the model slot's job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

import numpy as np

from service.core.config import Settings
from service.errors import (
    ModelChangeRefusedError,
    NotReadyError,
    SnapshotFailedError,
    SnapshotUnavailableError,
)
from service.gallery.follower import DEFAULT_POLL_S, ChangeFollower
from service.gallery.gallery import Gallery, IndexFactory
from service.gallery.index import ExactIndex
from service.gallery.recognition import Identification, Sources
from service.gallery.snapshot import (
    EXACT_NOT_SNAPSHOTTED,
    GalleryStart,
    SnapshotError,
    SnapshotManifest,
    open_gallery,
    save_snapshot,
    snapshots_index,
)
from service.gallery.store import (
    ChangeBatch,
    ChangeFeedStore,
    EnrolledIdentity,
    IdentityStore,
    ModelHistory,
    ServedModel,
    StoreError,
    open_store,
    store_location,
)
from service.offload import INLINE_SEARCH_ROWS, in_thread, inline_unless

logger = logging.getLogger("idembed.gallery")

# Kept images -> the new model's templates (None where the model cannot read an identity's images).
Templates = Callable[[list[list[bytes]]], list[np.ndarray | None]]


def identities_at_risk(
    counts: dict[str, int], history: ModelHistory, serving: str | None, new: ServedModel
) -> int:
    """How many identities serving `new` would stop matching: those enrolled by the model served until now
    (`serving`, else the one the store recorded; a store that recorded none: every other model's).

    Raises `ModelChangeRefusedError` when `new` reuses the id of the model that enrolled identities under it
    but embeds differently (another model.onnx or preprocessing): nothing could tell its identities apart.
    """
    known = history.fingerprints.get(new.model_id)
    same_id = counts.get(new.model_id, 0)
    if known is not None and known != new.fingerprint and same_id:
        raise ModelChangeRefusedError(
            f"bundle {new.model_id} is not the model that enrolled the {same_id} identities stored under "
            "that id (its model.onnx or preprocessing differ, the name:version is the same): export it "
            "with a new version (idembed-train --version), or delete those identities first",
            detail={"model_id": new.model_id, "identities": same_id},
        )
    previous = serving if serving is not None else history.served
    if previous is None:
        return sum(n for model, n in counts.items() if model != new.model_id)
    return 0 if previous == new.model_id else counts.get(previous, 0)


@dataclass
class ReembedJob:
    """A background re-embedding of the served model's identities (from their kept images) by a new model;
    the old model serves until it is done, then both swap at once. Progress is read while it runs."""

    model_id: str
    previous_model_id: str
    total: int  # identities with kept images to re-embed
    without_images: int  # identities of the previous model that will be orphaned (forced reload)
    done: int = 0
    skipped: int = 0  # kept images the new model could not read: those identities are orphaned
    state: Literal["running", "done", "failed"] = "running"
    error: str | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    cancelled: bool = False


@dataclass(frozen=True)
class ModelChange:
    """What serving another model does to the enrolled identities (`GalleryService.plan_change`)."""

    at_risk: int  # identities of the served model the new one would not match
    reembeddable: int  # of those, with kept images the new model can be re-embedded from
    counts: dict[str, int]  # stored identities by the model that enrolled them

    @property
    def orphaned(self) -> int:
        return self.at_risk - self.reembeddable


class GalleryService:
    """Store, gallery and change follower of one service process; `open` at start-up, `close` at shutdown."""

    follow_poll_s = DEFAULT_POLL_S  # how often the change feed is polled without a wake-up (NOTIFY)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: IdentityStore | None = None
        self._gallery: Gallery | None = None
        self._follower: ChangeFollower | None = None

    @property
    def gallery(self) -> Gallery:
        if self._gallery is None:
            raise NotReadyError("the gallery is not loaded yet; retry when /readyz returns 200")
        return self._gallery

    @property
    def loaded(self) -> bool:
        return self._gallery is not None

    @property
    def follower(self) -> ChangeFollower | None:
        """What keeps the index in step with the writes of other processes (None before start-up)."""
        return self._follower

    @property
    def problem(self) -> str | None:
        """Why the gallery cannot serve up-to-date results now (None: it can)."""
        return None if self._follower is None else self._follower.problem

    def index_factory(self) -> IndexFactory:
        if self.settings.gallery_index == "exact":
            return ExactIndex
        # Imported only when asked for: the ANN module pulls in usearch.
        from service.gallery.ann import make_index

        # A graph search misses only probes whose beam never reached their identity, and those show up as a
        # best match below the known/unknown line; the gallery passes each identify call's threshold (the
        # served bundle's or the request's) so exactly those are searched again with a wide beam, which lifts
        # recall@1 at 1M from ~0.95 to 0.999 at the small beam's p50 (docs/performance.md).
        return partial(make_index, self.settings.gallery_index)

    # --- start-up and shutdown ------------------------------------------------------------------------

    def open(
        self, served: ServedModel, dim: int, centers: np.ndarray, labels: list[str], embed: Templates
    ) -> tuple[GalleryStart, int]:
        """Blocking: open the store, accept (or refuse) the model, build the gallery, follow the feed.
        Returns how the gallery was built and how many stored identities the model does not match."""
        store = open_store(self.settings.store_url, dim)
        try:
            orphaned = self._accept_model(store, served, embed)
        except StoreError:
            store.close()
            raise
        self._store = store
        # From the snapshot (plus the store's changes since) when one fits, else rebuilt from the store; the
        # cursor is the point of the change feed the index reflects, where the follower carries on.
        start = open_gallery(
            self.settings.gallery_snapshot_path,
            centers,
            labels,
            store,
            index_factory=self.index_factory(),
            model_id=served.model_id,
        )
        self._gallery = start.gallery
        if start.cursor is not None and isinstance(store, ChangeFeedStore):
            self._follower = ChangeFollower(
                store,
                self._apply,
                cursor=start.cursor,
                rebuild=self._rebuild,
                poll_interval_s=self.follow_poll_s,
            ).start()
        return start, orphaned

    def _apply(self, batch: ChangeBatch) -> None:
        self.gallery.apply_changes(batch.upserts, batch.deleted)

    def _rebuild(self) -> int:
        """The follower's way back when the feed no longer reaches its cursor: an index from the store."""
        store = self._store
        assert isinstance(store, ChangeFeedStore)
        cursor = store.change_cursor()  # first: a write landing during the rebuild is replayed, never missed
        started = time.perf_counter()
        loaded = self.gallery.rebuild_enrolled(self.index_factory())
        logger.info(
            "gallery index rebuilt from the store",
            extra={"enrolled": loaded, "cursor": cursor, "seconds": round(time.perf_counter() - started, 2)},
        )
        return cursor

    def _accept_model(self, store: IdentityStore, served: ServedModel, embed: Templates) -> int:
        """Refuse (IDEMBED_ON_MODEL_CHANGE=refuse) or accept a start with another model than the one whose
        identities the store holds; returns how many identities this model does not match. With kept
        enrollment images, the previous model's identities that have them are re-embedded first."""
        history = store.model_history()
        counts = store.count_by_model()
        self._at_risk_at_start(counts, history, served)  # refuses a reused id with other weights
        previous = history.served
        if self.settings.keep_enrollment_images and previous is not None and previous != served.model_id:
            self._reembed_store(store, previous, served.model_id, embed)
            counts = store.count_by_model()
        at_risk = self._at_risk_at_start(counts, history, served)
        if at_risk and self.settings.on_model_change == "refuse":
            others = {m: n for m, n in counts.items() if m != served.model_id}
            raise StoreError(
                f"the identity store holds {at_risk} identities enrolled by another model ({others}) than "
                f"this bundle's {served.model_id}; their embeddings are not comparable with its. Serve that "
                "model again, or set IDEMBED_ON_MODEL_CHANGE=orphan to start anyway: they are kept, listed "
                "as stale and never matched until re-enrolled"
            )
        store.record_served_model(served)
        return sum(n for m, n in counts.items() if m != served.model_id)

    def _at_risk_at_start(self, counts: dict[str, int], history: ModelHistory, served: ServedModel) -> int:
        try:
            return identities_at_risk(counts, history, None, served)
        except ModelChangeRefusedError as exc:
            where = store_location(self.settings.store_url)
            raise StoreError(f"identity store {where}: {exc.message}") from exc

    def _reembed_store(self, store: IdentityStore, previous: str, model_id: str, embed: Templates) -> None:
        """At start-up, before anything is served: the previous model's identities with kept images get the
        new model's templates, in batches (each batch one store transaction)."""
        started = time.perf_counter()
        done = skipped = 0
        for records in store.iter_all(self.settings.max_batch_size):
            with_images, images = self._with_images(store, records, previous)
            if not with_images:
                continue
            templates = embed([images[r.key] for r in with_images])
            made = {r.key: t for r, t in zip(with_images, templates, strict=True) if t is not None}
            done += len(store.reembed(previous, model_id, made))
            skipped += len(with_images) - len(made)
        logger.info(
            "gallery re-embedded at start-up",
            extra={
                "model_id": model_id,
                "previous_model_id": previous,
                "reembedded": done,
                "skipped": skipped,
                "seconds": round(time.perf_counter() - started, 2),
            },
        )

    @staticmethod
    def _with_images(
        store: IdentityStore, records: list[EnrolledIdentity], model_id: str
    ) -> tuple[list[EnrolledIdentity], dict[int, list[bytes]]]:
        """The records `model_id` enrolled that have kept images, and those images by key."""
        mine = [r for r in records if r.model_id == model_id]
        images = store.images_of([r.key for r in mine])
        return [r for r in mine if r.key in images], images

    async def close(self) -> None:
        """Stop following changes, snapshot the gallery (if configured), close the store."""
        if self._follower is not None:
            await in_thread(self._follower.stop)
        await self._snapshot_on_shutdown()
        self._follower = None
        if self._store is not None:
            self._store.close()
            self._store = None

    # --- snapshots --------------------------------------------------------------------------------------

    def _snapshot_cursor(self) -> int:
        """The change cursor the index reflects: the follower's (every write this process made went through
        the gallery too, so a write it has not seen yet is replayed on restore, which is idempotent)."""
        if self._follower is not None:
            return self._follower.cursor
        assert isinstance(self._store, ChangeFeedStore)
        return self._store.change_cursor()

    async def write_snapshot(self) -> SnapshotManifest:
        """Save the gallery index into IDEMBED_GALLERY_SNAPSHOT_PATH (admin endpoint, graceful shutdown),
        then prune the change feed to IDEMBED_CHANGE_FEED_KEEP."""
        directory = self.settings.gallery_snapshot_path
        if directory is None:
            raise SnapshotUnavailableError(
                "no gallery snapshot folder is configured (IDEMBED_GALLERY_SNAPSHOT_PATH)"
            )
        if not snapshots_index(self.settings.gallery_index):
            raise SnapshotUnavailableError(EXACT_NOT_SNAPSHOTTED)
        gallery = self.gallery
        if self._follower is not None:
            # Catch up first: the snapshot then holds everything written until now, by any process.
            await in_thread(self._follower.poll)
        try:
            manifest = await in_thread(save_snapshot, directory, gallery, self._snapshot_cursor)
        except SnapshotError as exc:
            raise SnapshotFailedError(str(exc)) from exc
        # The feed only has to reach back to the newest snapshot (and to processes that lag); without
        # pruning it grows by one row per write forever. Never past this snapshot's cursor (which this
        # process's follower has reached): both must be able to catch up from it.
        pruned = 0
        if isinstance(self._store, ChangeFeedStore):
            keep = self.settings.change_feed_keep
            pruned = await in_thread(self._store.prune_changes, keep, not_past=manifest.cursor)
        logger.info(
            "gallery snapshot written",
            extra={
                "path": str(directory),
                "identities": manifest.identities,
                "cursor": manifest.cursor,
                "write_s": manifest.write_seconds,
                "changes_pruned": pruned,
            },
        )
        return manifest

    async def _snapshot_on_shutdown(self) -> None:
        configured = self.settings.gallery_snapshot_path is not None
        if self._gallery is None or not configured or not snapshots_index(self.settings.gallery_index):
            return
        try:
            await self.write_snapshot()
        except SnapshotFailedError as exc:
            # A snapshot is only a faster start; failing to write one must not stop the shutdown.
            logger.error("gallery snapshot not written on shutdown: %s", exc.message)

    # --- requests ---------------------------------------------------------------------------------------

    async def identify(
        self, vectors: np.ndarray, top_k: int, *, threshold: float, sources: Sources, model_id: str
    ) -> list[Identification]:
        """Raises `ModelChangedError` if `model_id` (the model that made `vectors`) is no longer served."""
        gallery = self.gallery
        heavy = gallery.num_enrolled > INLINE_SEARCH_ROWS
        search = partial(gallery.identify, vectors, top_k, threshold=threshold, sources=sources)
        return await inline_unless(heavy, search, model_id=model_id)

    async def enroll(
        self, name: str, vectors: np.ndarray, *, model_id: str, images: list[bytes] | None, **kw: Any
    ) -> tuple[EnrolledIdentity, bool]:
        # The store commits with fsync: keep that wait off the event loop.
        kept = images if self.settings.keep_enrollment_images else None
        return await in_thread(self.gallery.enroll, name, vectors, model_id=model_id, images=kept, **kw)

    async def delete(self, name: str) -> EnrolledIdentity | None:
        return await in_thread(self.gallery.delete, name)

    async def get(self, name: str) -> EnrolledIdentity | None:
        return await in_thread(self.gallery.store.get, name)

    async def page(self, offset: int, limit: int) -> tuple[list[EnrolledIdentity], int]:
        """A page of stored identities (every model's) and how many there are in all."""
        store = self.gallery.store
        return await in_thread(store.list, offset=offset, limit=limit), await in_thread(store.count)

    async def orphaned(self, model_id: str) -> int:
        """Stored identities `model_id` does not match (enrolled by another model)."""
        counts = await in_thread(self.gallery.store.count_by_model)
        return sum(n for model, n in counts.items() if model != model_id)

    # --- model changes ----------------------------------------------------------------------------------

    async def plan_change(self, serving: str, new: ServedModel) -> ModelChange:
        """What serving `new` instead of `serving` does to the enrolled identities; `ModelChangeRefusedError`
        if `new` reuses the id of the model behind stored identities with other weights."""
        store = self.gallery.store
        counts = await in_thread(store.count_by_model)
        history = await in_thread(store.model_history)
        at_risk = identities_at_risk(counts, history, serving, new)
        reembeddable = 0
        if new.model_id != self.gallery.model_id and at_risk and self.settings.keep_enrollment_images:
            kept = await in_thread(store.count_with_images_by_model)
            reembeddable = kept.get(serving, 0)
        return ModelChange(at_risk, reembeddable, counts)

    async def prepare_model(self, model_id: str, centers: np.ndarray, labels: list[str]) -> None:
        """Build the view of another model beside the served one (`Gallery.prepare_model`)."""
        gallery = self.gallery
        index = self.index_factory()(gallery.dim)
        try:
            await in_thread(gallery.prepare_model, model_id, centers, labels, index)
        except BaseException:
            gallery.abort_model()
            raise

    async def record_served(self, served: ServedModel) -> None:
        await in_thread(self.gallery.store.record_served_model, served)

    async def reembed(self, job: ReembedJob, embed: Templates) -> None:
        """The served model's identities with kept images, embedded by the new model batch by batch into the
        prepared view (a worker thread; competes with serving for CPU one batch at a time)."""
        await in_thread(self._reembed_gallery, job, embed)

    def _reembed_gallery(self, job: ReembedJob, embed: Templates) -> None:
        gallery = self.gallery
        store = gallery.store
        for records in store.iter_all(self.settings.max_batch_size):
            if job.cancelled:
                return
            with_images, images = self._with_images(store, records, job.previous_model_id)
            if not with_images:
                continue
            templates = embed([images[r.key] for r in with_images])
            made = [(r, t) for r, t in zip(with_images, templates, strict=True) if t is not None]
            gallery.add_reembedded([r for r, _ in made], [t for _, t in made])
            job.done += len(with_images)
            job.skipped += len(with_images) - len(made)

    async def commit_reembedded(self, from_model: str, embed: Templates) -> tuple[int, int]:
        """Store the re-embedded templates and serve the prepared view (`Gallery.commit_reembedded`)."""
        return await in_thread(self.gallery.commit_reembedded, from_model, embed)
