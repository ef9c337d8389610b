"""The service's live state: the loaded model with its batching engine, the gallery, and hot reload.

Routes ask the runtime for embeddings and searches; they never hold a model themselves, so a hot reload is
one reference swap. Requests already running finish on the model they started with (the old engine drains
before it stops), and requests arriving after the swap use the new one: nothing in flight is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from anyio import to_thread

from bundle.errors import BundleError
from bundle.manifest import MODEL_FILE
from service.core.config import Settings
from service.engine import BatchingEngine, BatchObserver, EngineClosedError
from service.errors import (
    InvalidBundleError,
    InvalidInputError,
    ModelChangeRefusedError,
    NotReadyError,
    ServiceError,
    SnapshotFailedError,
    SnapshotUnavailableError,
)
from service.gallery.gallery import (
    Gallery,
    Identification,
    IndexFactory,
    ModelChangedError,
    Sources,
    mean_embedding,
)
from service.gallery.index import ExactIndex
from service.gallery.snapshot import SnapshotError, SnapshotManifest, open_gallery, save_snapshot
from service.gallery.store import (
    ChangeFeedStore,
    EnrolledIdentity,
    IdentityStore,
    ModelHistory,
    ServedModel,
    StoreError,
    open_store,
)
from service.model import EmbeddingModel, RuntimeOptions
from service.preprocess import ImagePreprocessor

logger = logging.getLogger("idembed.runtime")

# Decoding a few small images costs tens of microseconds, less than a hop to a worker thread; large uploads
# (a 12 MP JPEG takes ~100 ms) would stall every other request on the event loop, so they go to a thread.
_INLINE_DECODE_BYTES = 256 * 1024
_INLINE_SEARCH_ROWS = 20_000
# A request whose embeddings were made by a model that a reload has just replaced is embedded again with the
# new one; reloads are seconds apart at the very least, so a third swap within one request means trouble.
_MODEL_CHANGE_RETRIES = 3


class Follower(Protocol):
    cursor: int  # the store change cursor the gallery's index reflects

    def stop(self) -> None: ...


@dataclass
class LoadedModel:
    model: EmbeddingModel
    engine: BatchingEngine
    preprocess: ImagePreprocessor
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def threshold(self) -> float:
        """The bundle's calibrated threshold (similarity at the target false-accept rate)."""
        return self.model.manifest.thresholds.default

    @property
    def served(self) -> ServedModel:
        return ServedModel(self.model_id, model_fingerprint(self.model))


def model_fingerprint(model: EmbeddingModel) -> str:
    """What decides the embedding space: the ONNX graph's digest, its input and the preprocessing."""
    manifest = model.manifest
    digest = hashlib.sha256(manifest.files[MODEL_FILE].sha256.encode())
    digest.update(manifest.input.model_dump_json().encode())
    digest.update(manifest.preprocessing.model_dump_json().encode())
    return digest.hexdigest()[:32]


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


@dataclass(frozen=True)
class ReloadResult:
    model: LoadedModel
    previous_model_id: str
    orphaned: int  # identities of the previous model left unmatched by this reload (forced)
    job: ReembedJob | None = None  # set: the swap waits for this background re-embedding


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


def embed_templates(
    loaded: LoadedModel, groups: list[list[bytes]], batch_size: int
) -> list[np.ndarray | None]:
    """Templates (normalised mean embedding) of identities from their kept images with `loaded`'s model,
    called off the event loop (onnxruntime directly, not the batching engine); None for an identity whose
    images the model cannot read (decode or preprocessing errors)."""
    flat = [(gi, image) for gi, group in enumerate(groups) for image in group]
    vectors: list[list[np.ndarray]] = [[] for _ in groups]
    failed: set[int] = set()
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        try:
            batch = loaded.preprocess([image for _, image in chunk], field="kept image")
        except ServiceError:
            batch = None
        if batch is None:  # one unreadable image: find which, one at a time
            for gi, image in chunk:
                try:
                    vectors[gi].append(loaded.model.run(loaded.preprocess([image], field="kept image"))[0])
                except ServiceError:
                    failed.add(gi)
            continue
        for (gi, _), vector in zip(chunk, loaded.model.run(batch), strict=True):
            vectors[gi].append(vector)
    return [None if gi in failed or not v else mean_embedding(np.stack(v)) for gi, v in enumerate(vectors)]


@dataclass(frozen=True)
class IdentifyResult:
    results: list[Identification]
    model_id: str  # the model that made the query embeddings and whose identities were searched
    threshold: float
    sources: Sources


class ServiceRuntime:
    """Owns model, engine, gallery and store for one app; `start`/`stop` are called by the app lifespan."""

    def __init__(
        self,
        settings: Settings,
        observer: BatchObserver | None = None,
        on_model_change: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self._observer = observer
        self._on_model_change = on_model_change
        self._current: LoadedModel | None = None
        self._gallery: Gallery | None = None
        self._store: IdentityStore | None = None
        self._reload_lock = asyncio.Lock()
        self.bundle_path = settings.bundle_path
        self.startup_error: str | None = None
        self._follower: Follower | None = None
        self._snapshot_lock = asyncio.Lock()
        # While a re-embedding job commits, the gallery may already serve the new model: `current` follows it.
        self._next: LoadedModel | None = None
        self.job: ReembedJob | None = None
        self._job_task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._current is not None and not self._current.engine.closing

    @property
    def current(self) -> LoadedModel:
        """The model serving requests: the one whose identities the gallery searches."""
        upcoming = self._next
        if upcoming is not None and self._gallery is not None and self._gallery.model_id == upcoming.model_id:
            return upcoming  # a background re-embedding just swapped the gallery in its worker thread
        if self._current is None:
            raise NotReadyError("the model is not loaded yet; retry when /readyz returns 200")
        return self._current

    @property
    def gallery(self) -> Gallery:
        if self._gallery is None:
            raise NotReadyError("the gallery is not loaded yet; retry when /readyz returns 200")
        return self._gallery

    def _load_model(self, path: Path) -> LoadedModel:
        s = self.settings
        options = RuntimeOptions(
            s.intra_op_threads(),
            s.ort_inter_op_threads,
            s.ort_allow_spinning,
            warmup_batch_size=s.max_batch_size,
            warmup_concurrency=s.inference_workers,
        )
        model = EmbeddingModel.load(path, options)
        lone_threads = s.lone_batch_threads()
        lone_model = None
        if lone_threads is not None:
            # The same verified bundle, a second session: every core, for batches that run alone (engine doc).
            # Its threads spin between the parallel sections of a call (waking sleeping threads costs 0.3 ms
            # per 112x112 image) and stop when it ends, burning no core between requests (docs/service.md).
            lone_options = replace(
                options,
                intra_op_threads=lone_threads,
                allow_spinning=True,
                stop_spinning_after_run=True,
                warmup_concurrency=1,
            )
            lone_model = EmbeddingModel(model.bundle, lone_options)
        engine = BatchingEngine(
            model.run,
            max_batch_size=s.max_batch_size,
            batch_wait_ms=s.batch_wait_ms,
            max_queue_depth=s.max_queue_depth,
            observer=self._observer,
            inline_max_ms=s.inline_inference_max_ms,
            workers=s.inference_workers,
            lone_run=None if lone_model is None else lone_model.run,
            lone_inline_max_ms=s.lone_inline_max_ms,
        )
        manifest = model.manifest
        pre = ImagePreprocessor(manifest.preprocessing, manifest.input, max_pixels=s.max_image_pixels)
        return LoadedModel(model=model, engine=engine, preprocess=pre)

    def _follow_changes(self, store: IdentityStore, cursor: int) -> Follower:
        """Keep this replica's index in step with identities other replicas write to the shared store.

        Only for stores other processes write (PostgreSQL): the SQLite store has a change feed too, but one
        process owns the file and its gallery applies its own writes, so there is nothing to follow.
        """
        from service.gallery.pg_store import ChangeBatch, ChangeFollower, PostgresIdentityStore

        assert isinstance(store, PostgresIdentityStore)
        gallery = self.gallery

        def apply(batch: ChangeBatch) -> None:
            gallery.apply_changes(batch.upserts, batch.deleted)

        return ChangeFollower(store, apply, cursor=cursor).start()

    def _index_factory(self) -> IndexFactory:
        if self.settings.gallery_index == "exact":
            return ExactIndex
        # Imported only when asked for: the ANN module pulls in usearch.
        from service.gallery.ann import make_index

        # A graph search misses only probes whose beam never reached their identity, and those show up as a
        # best match below the known/unknown line; the gallery passes each identify call's threshold (the
        # served bundle's or the request's) so exactly those are searched again with a wide beam, which lifts
        # recall@1 at 1M from ~0.95 to 0.999 at the small beam's p50 (docs/performance.md).
        return partial(make_index, self.settings.gallery_index)

    def _check_start_model(self, store: IdentityStore, loaded: LoadedModel) -> int:
        """Refuse (IDEMBED_ON_MODEL_CHANGE=refuse) or accept a start with another model than the one whose
        identities the store holds; returns how many identities this model does not match. With kept
        enrollment images, the previous model's identities that have them are re-embedded first."""
        served = loaded.served
        history = store.model_history()
        counts = store.count_by_model()
        try:
            identities_at_risk(counts, history, None, served)  # refuses a reused id with other weights
        except ModelChangeRefusedError as exc:
            where = self.settings.store_url.split("@")[-1]
            raise StoreError(f"identity store {where}: {exc.message}") from exc
        previous = history.served
        if self.settings.keep_enrollment_images and previous is not None and previous != served.model_id:
            self._reembed_store(store, previous, loaded)
            counts = store.count_by_model()
        try:
            at_risk = identities_at_risk(counts, history, None, served)
        except ModelChangeRefusedError as exc:
            where = self.settings.store_url.split("@")[-1]
            raise StoreError(f"identity store {where}: {exc.message}") from exc
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

    def _reembed_store(self, store: IdentityStore, previous: str, loaded: LoadedModel) -> None:
        """At start-up, before anything is served: the previous model's identities with kept images get the
        new model's templates, in batches (each batch one store transaction)."""
        started = time.perf_counter()
        done = skipped = 0
        for records in store.iter_all(self.settings.max_batch_size):
            mine = [r for r in records if r.model_id == previous]
            images = store.images_of([r.key for r in mine])
            with_images = [r for r in mine if r.key in images]
            if not with_images:
                continue
            groups = [images[r.key] for r in with_images]
            templates = embed_templates(loaded, groups, self.settings.max_batch_size)
            made = {r.key: t for r, t in zip(with_images, templates, strict=True) if t is not None}
            done += len(store.reembed(previous, loaded.model_id, made))
            skipped += len(with_images) - len(made)
        logger.info(
            "gallery re-embedded at start-up",
            extra={
                "model_id": loaded.model_id,
                "previous_model_id": previous,
                "reembedded": done,
                "skipped": skipped,
                "seconds": round(time.perf_counter() - started, 2),
            },
        )

    async def start(self) -> None:
        """Load, verify and warm the bundle, open the store, build the gallery; raise on any fault."""
        start = time.perf_counter()
        loaded = await to_thread.run_sync(self._load_model, self.bundle_path)
        store = await to_thread.run_sync(open_store, self.settings.store_url, loaded.model.dim)
        self._store = store
        try:
            orphaned = await to_thread.run_sync(self._check_start_model, store, loaded)
        except StoreError:
            self._store = None
            store.close()
            raise
        bundle = loaded.model.bundle
        # From the snapshot (plus the store's changes since) when one fits, else rebuilt from the store; the
        # cursor is the point of the change feed the index reflects, where a follower carries on.
        opened = partial(
            open_gallery,
            self.settings.gallery_snapshot_path,
            index_factory=self._index_factory(),
            model_id=loaded.model_id,
        )
        start_gallery = await to_thread.run_sync(opened, bundle.centers, bundle.labels, store)
        self._gallery = start_gallery.gallery
        if (
            start_gallery.cursor is not None
            and isinstance(store, ChangeFeedStore)
            and store.shared_by_replicas
        ):
            self._follower = await to_thread.run_sync(self._follow_changes, store, start_gallery.cursor)
        loaded.engine.start()
        self._current = loaded
        if self._on_model_change is not None:
            self._on_model_change(loaded.model_id)
        logger.info(
            "model loaded",
            extra={
                "model_id": loaded.model_id,
                "bundle": str(self.bundle_path),
                "centers": self._gallery.num_centers,
                "enrolled": self._gallery.num_enrolled,
                "orphaned": orphaned,
                "gallery_source": start_gallery.source,
                "warmup_ms": round(loaded.model.warmup_ms, 2),
                "startup_ms": round((time.perf_counter() - start) * 1000, 1),
            },
        )

    def _snapshot_cursor(self) -> int:
        """The change cursor the index reflects: the follower's with a shared store; with a store only this
        process writes, every write went through the gallery, so the store's newest change."""
        if self._follower is not None:
            return self._follower.cursor
        assert isinstance(self._store, ChangeFeedStore)
        return self._store.change_cursor()

    async def write_snapshot(self) -> SnapshotManifest:
        """Save the gallery index into IDEMBED_GALLERY_SNAPSHOT_PATH (admin endpoint, graceful shutdown)."""
        directory = self.settings.gallery_snapshot_path
        if directory is None:
            raise SnapshotUnavailableError(
                "no gallery snapshot folder is configured (IDEMBED_GALLERY_SNAPSHOT_PATH)"
            )
        if self.settings.gallery_index == "exact":
            raise SnapshotUnavailableError(
                "the exact gallery index rebuilds from the store in seconds and is not snapshotted; "
                "snapshots are for IDEMBED_GALLERY_INDEX=hnsw or auto"
            )
        gallery = self.gallery
        async with self._snapshot_lock:
            try:
                manifest = await to_thread.run_sync(save_snapshot, directory, gallery, self._snapshot_cursor)
            except SnapshotError as exc:
                raise SnapshotFailedError(str(exc)) from exc
            # The feed only has to reach back to the newest snapshot (and, with a shared store, to replicas
            # that lag); without pruning it grows by one row per write forever.
            pruned = 0
            if isinstance(self._store, ChangeFeedStore):
                pruned = await to_thread.run_sync(self._store.prune_changes, self.settings.change_feed_keep)
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
        if self._gallery is None or self.settings.gallery_snapshot_path is None:
            return
        if self.settings.gallery_index == "exact":
            return
        try:
            await self.write_snapshot()
        except SnapshotFailedError as exc:
            # A snapshot is only a faster start; failing to write one must not stop the shutdown.
            logger.error("gallery snapshot not written on shutdown: %s", exc.message)

    async def stop(self) -> None:
        """Finish queued batches, stop following changes, snapshot the gallery (if set), close the store."""
        if self.job is not None and self._job_task is not None and not self._job_task.done():
            self.job.cancelled = True  # the old model keeps the gallery; the job ends at its next batch
            await self._job_task
        if self._current is not None:
            await self._current.engine.stop(self.settings.shutdown_timeout_s)
        if self._follower is not None:
            await to_thread.run_sync(self._follower.stop)
        await self._snapshot_on_shutdown()
        self._follower = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def resolve_bundle(self, name: str | None) -> Path:
        """A reload target: a folder inside the reload root (models_dir); anything outside is refused."""
        if name is None:
            return self.bundle_path
        root = self.settings.reload_root
        candidate = (root / name).resolve()
        if not candidate.is_relative_to(root):
            raise InvalidInputError(
                f"bundle {name!r} is outside the models folder this service may load from",
                detail={"models_dir": root.name},
            )
        return candidate

    async def reload(self, name: str | None, *, force: bool = False) -> ReloadResult:
        """Load, verify and warm a bundle, then swap it in; a bad bundle leaves the current model serving.

        Another model than the one served would leave the identities it enrolled unmatched: refused with
        `ModelChangeRefusedError` (409) naming how many, unless `force`. The new model's gallery view (its
        centers and the identities it enrolled) is built while the old model serves, then both are swapped in
        together, so no request scores one model's embedding against another's."""
        path = self.resolve_bundle(name)
        # Refuse before waiting: a background re-embedding holds the reload lock until it swaps, so a check
        # made only under the lock would block this request until then (seen under load) instead of a 409.
        self._refuse_while_reembedding()
        async with self._reload_lock:
            self._refuse_while_reembedding()
            old = self.current
            gallery = self.gallery
            try:
                new = await to_thread.run_sync(self._load_model, path)
            except BundleError as exc:
                raise InvalidBundleError(
                    f"bundle refused, still serving {old.model_id}: {exc.problem}",
                    detail={"file": exc.path.name, "problem": exc.problem},
                ) from exc
            if new.model.dim != gallery.dim:
                raise InvalidBundleError(
                    f"bundle refused, still serving {old.model_id}: it produces {new.model.dim}-d embeddings "
                    f"but the enrolled identities are {gallery.dim}-d",
                    detail={"embedding_dim": new.model.dim, "store_dim": gallery.dim},
                )
            store = gallery.store
            counts = await to_thread.run_sync(store.count_by_model)
            history = await to_thread.run_sync(store.model_history)
            at_risk = identities_at_risk(counts, history, old.model_id, new.served)
            switching = new.model_id != gallery.model_id
            with_images = 0
            if switching and at_risk and self.settings.keep_enrollment_images:
                kept = await to_thread.run_sync(store.count_with_images_by_model)
                with_images = kept.get(old.model_id, 0)
            orphaned = at_risk - with_images
            if orphaned and not force:
                kept_note = (
                    f" ({with_images} with kept images would be re-embedded; the others were enrolled from "
                    "embeddings or before images were kept)"
                    if self.settings.keep_enrollment_images
                    else ""
                )
                raise ModelChangeRefusedError(
                    f"reload refused, still serving {old.model_id}: {new.model_id} would orphan {orphaned} "
                    f"identities enrolled by {old.model_id} (their embeddings are not comparable with the "
                    f"new model's, so they would never match until re-enrolled){kept_note}; send force=true "
                    "to reload anyway",
                    detail={
                        "orphaned": orphaned,
                        "reembeddable": with_images,
                        "model_id": new.model_id,
                        "serving_model_id": old.model_id,
                        "enrolled_by_model": counts,
                    },
                )
            if with_images:
                job = ReembedJob(new.model_id, old.model_id, total=with_images, without_images=orphaned)
                self.job = job
                self._job_task = asyncio.create_task(self._run_reembedding(new, old, path, job))
                logger.info(
                    "re-embedding the gallery before the reload",
                    extra={"model_id": new.model_id, "identities": with_images, "orphaned": orphaned},
                )
                return ReloadResult(new, old.model_id, orphaned, job)
            bundle = new.model.bundle
            if switching:
                index = self._index_factory()(gallery.dim)
                prepare = partial(gallery.prepare_model, new.model_id, bundle.centers, bundle.labels, index)
                try:
                    await to_thread.run_sync(prepare)
                except BaseException:
                    gallery.abort_model()
                    raise
            new.engine.start()
            # From here to the swap nothing awaits: no request sees the new gallery with the old model.
            if switching:
                gallery.commit_model()
            else:
                gallery.set_centers(bundle.centers, bundle.labels)
            self._current = new
            self.bundle_path = path
            if self._on_model_change is not None:
                self._on_model_change(new.model_id)
            await to_thread.run_sync(store.record_served_model, new.served)
        logger.info(
            "model reloaded",
            extra={"model_id": new.model_id, "previous_model_id": old.model_id, "orphaned": at_risk},
        )
        # Requests that took the old engine before the swap are still queued on it: let it drain.
        await old.engine.stop(self.settings.shutdown_timeout_s)
        return ReloadResult(new, old.model_id, at_risk)

    def _refuse_while_reembedding(self) -> None:
        job = self.job
        if job is not None and job.state == "running":
            raise ModelChangeRefusedError(
                f"reload refused: the gallery is being re-embedded for {job.model_id} ({job.done} of "
                f"{job.total} identities); retry once GET /v1/admin/reembed says it is done",
                detail={"model_id": job.model_id, "done": job.done, "total": job.total},
            )

    async def _run_reembedding(self, new: LoadedModel, old: LoadedModel, path: Path, job: ReembedJob) -> None:
        """The background half of a reload with kept images: build the new model's gallery view from them
        while the old model serves, then store the new templates and swap model and gallery together."""
        batch_size = self.settings.max_batch_size
        started = time.perf_counter()
        async with self._reload_lock:
            gallery = self.gallery
            bundle = new.model.bundle
            engine_started = False
            try:
                index = self._index_factory()(gallery.dim)
                prepare = partial(gallery.prepare_model, new.model_id, bundle.centers, bundle.labels, index)
                await to_thread.run_sync(prepare)
                await to_thread.run_sync(self._reembed_gallery, gallery, new, job)
                if job.cancelled:
                    raise RuntimeError("cancelled: the service is shutting down")
                new.engine.start()
                engine_started = True
                self._next = new  # `current` follows the gallery from the moment the commit swaps it
                commit = partial(
                    gallery.commit_reembedded,
                    old.model_id,
                    lambda groups: embed_templates(new, groups, batch_size),
                )
                replaced, settled = await to_thread.run_sync(commit)
            except Exception as exc:
                gallery.abort_model()
                self._next = None
                if engine_started:
                    await new.engine.stop(self.settings.shutdown_timeout_s)
                job.state, job.error, job.finished_at = "failed", str(exc), datetime.now(UTC)
                logger.error(
                    "re-embedding for %s failed, still serving %s: %s", new.model_id, old.model_id, exc
                )
                return
            self._current, self._next = new, None
            self.bundle_path = path
            if self._on_model_change is not None:
                self._on_model_change(new.model_id)
            await to_thread.run_sync(gallery.store.record_served_model, new.served)
            job.state, job.finished_at = "done", datetime.now(UTC)
        logger.info(
            "model reloaded after re-embedding the gallery",
            extra={
                "model_id": new.model_id,
                "previous_model_id": old.model_id,
                "reembedded": replaced,
                "settled_during_commit": settled,
                "skipped": job.skipped,
                "orphaned": job.without_images,
                "seconds": round(time.perf_counter() - started, 2),
            },
        )
        await old.engine.stop(self.settings.shutdown_timeout_s)

    def _reembed_gallery(self, gallery: Gallery, new: LoadedModel, job: ReembedJob) -> None:
        """Worker thread: the served model's identities with kept images, embedded by `new` batch by batch
        into the gallery's prepared view. Competes with serving for CPU (one batch at a time)."""
        store = gallery.store
        batch_size = self.settings.max_batch_size
        for records in store.iter_all(batch_size):
            if job.cancelled:
                return
            mine = [r for r in records if r.model_id == job.previous_model_id]
            images = store.images_of([r.key for r in mine])
            with_images = [r for r in mine if r.key in images]
            if not with_images:
                continue
            templates = embed_templates(new, [images[r.key] for r in with_images], batch_size)
            made = [(r, t) for r, t in zip(with_images, templates, strict=True) if t is not None]
            gallery.add_reembedded([r for r, _ in made], [t for _, t in made])
            job.done += len(with_images)
            job.skipped += len(with_images) - len(made)

    @property
    def default_threshold(self) -> float:
        """The served bundle's calibrated threshold (similarity at the target false-accept rate)."""
        return self.current.threshold

    async def _in_thread_if_large(self, call: Callable[[], object]) -> object:
        # Exact search over a few thousand vectors takes microseconds; a large gallery goes to a thread.
        if self.gallery.num_enrolled <= _INLINE_SEARCH_ROWS:
            return call()
        return await to_thread.run_sync(call)

    async def identify(
        self,
        images: list[bytes] | None,
        embeddings: list[list[float]] | None,
        *,
        top_k: int,
        threshold: float | None = None,
        sources: Sources | None = None,
    ) -> IdentifyResult:
        """Embed (or check) the queries and identify them against the served model's gallery.

        The threshold is the request's, else the calibrated one of the bundle that embedded the queries; it
        decides known/unknown for every source and is the line below which an HNSW search is retried."""
        scope: Sources = sources or self.settings.identify_sources
        for _ in range(_MODEL_CHANGE_RETRIES):
            vectors, loaded = await self._query_vectors(images, embeddings)
            line = threshold if threshold is not None else loaded.threshold
            search = partial(
                self.gallery.identify,
                vectors,
                top_k,
                threshold=line,
                sources=scope,
                model_id=loaded.model_id,
            )
            try:
                results = await self._in_thread_if_large(search)
            except ModelChangedError:
                continue  # a reload swapped the model after these were embedded: embed them again
            assert isinstance(results, list)
            return IdentifyResult(results, loaded.model_id, line, scope)
        raise NotReadyError("the served model changed several times during this request; retry it")

    async def enroll(
        self,
        name: str,
        images: list[bytes] | None,
        embeddings: list[list[float]] | None,
        *,
        metadata: dict[str, object] | None,
        replace: bool,
    ) -> tuple[EnrolledIdentity, bool]:
        """Embed (or check) and durably enroll one identity, always with the model being served."""
        for _ in range(_MODEL_CHANGE_RETRIES):
            vectors, loaded = await self._query_vectors(images, embeddings)
            enroll = partial(
                self.gallery.enroll,
                name,
                vectors,
                model_id=loaded.model_id,
                metadata=metadata,
                replace=replace,
                images=images if self.settings.keep_enrollment_images else None,
            )
            try:
                # The store commits with fsync: keep that wait off the event loop.
                return await to_thread.run_sync(enroll)
            except ModelChangedError:
                continue
        raise NotReadyError("the served model changed several times during this request; retry it")

    async def verify(
        self, sides: list[tuple[str, bytes | None, list[float] | None]], threshold: float | None
    ) -> tuple[float, float, str]:
        """(similarity, threshold, model id) of two faces, each an image or an embedding (`name`, image,
        embedding); both images go to the model in one call. The threshold is the request's, else the
        calibrated one of the bundle that embedded them."""
        to_embed = [image for _, image, emb in sides if emb is None and image is not None]
        loaded = self.current
        embedded_rows = iter(())
        if to_embed:
            embedded, loaded = await self._embed(to_embed, field_name="image")
            embedded_rows = iter(embedded)
        vectors = []
        for side, _, emb in sides:
            if emb is None:
                vectors.append(next(embedded_rows))
            else:
                vectors.append(self.check_embeddings([emb], f"embedding_{side}", loaded)[0])
        a, b = (v / np.linalg.norm(v) for v in vectors)
        similarity = float(np.clip(np.dot(a, b), -1.0, 1.0))
        return similarity, threshold if threshold is not None else loaded.threshold, loaded.model_id

    async def orphaned(self) -> int:
        """Stored identities the served model does not match (enrolled by another model)."""
        counts = await to_thread.run_sync(self.gallery.store.count_by_model)
        return sum(n for model, n in counts.items() if model != self.current.model_id)

    def check_embeddings(
        self, embeddings: list[list[float]], field_name: str, loaded: LoadedModel | None = None
    ) -> np.ndarray:
        """Client-supplied embeddings -> float32 [n, dim]; wrong dimension or all-zero vectors are refused.
        They are taken to be the served model's (`loaded`, default the current one)."""
        dim = (loaded or self.current).model.dim
        got = sorted({len(e) for e in embeddings})
        if got != [dim]:
            raise InvalidInputError(
                f"{field_name} must have {dim} values each (the model's embedding dim), got {got}",
                detail={"expected_dim": dim},
            )
        # Values beyond float32's range become inf here, so this also catches 1e300.
        with np.errstate(over="ignore"):
            array = np.asarray(embeddings, dtype=np.float32)
        if not np.all(np.isfinite(array)):
            raise InvalidInputError(f"{field_name} contains NaN or infinite values (as float32)")
        if np.any(np.linalg.norm(array, axis=1) == 0):
            raise InvalidInputError(f"{field_name} contains an all-zero vector, which has no direction")
        return array

    async def _query_vectors(
        self, images: list[bytes] | None, embeddings: list[list[float]] | None
    ) -> tuple[np.ndarray, LoadedModel]:
        """What a request searches or enrolls with: its images embedded, else its own embeddings checked;
        with the model that embedded them (for client embeddings, the one served now)."""
        if images is not None:
            return await self._embed(images)
        assert embeddings is not None  # the request schemas require one of the two
        loaded = self.current
        return self.check_embeddings(embeddings, "embeddings", loaded), loaded

    async def embed_images(self, images: list[bytes], field_name: str = "images") -> tuple[np.ndarray, str]:
        """Decode, preprocess and embed images in one engine call; returns (embeddings, model id)."""
        vectors, loaded = await self._embed(images, field_name)
        return vectors, loaded.model_id

    async def _embed(self, images: list[bytes], field_name: str = "images") -> tuple[np.ndarray, LoadedModel]:
        while True:
            loaded = self.current
            if sum(len(i) for i in images) <= _INLINE_DECODE_BYTES:
                inputs = loaded.preprocess(images, field=field_name)
            else:
                inputs = await to_thread.run_sync(partial(loaded.preprocess, images, field=field_name))
            try:
                return await loaded.engine.embed(inputs), loaded
            except EngineClosedError:
                # A hot reload swapped the model while this request was preprocessing: redo it on the new
                # one (its preprocessing may differ). Shutting down is the only other cause: then give up.
                if self._current is loaded or self._current is None:
                    raise
