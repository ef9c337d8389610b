"""The service's live state: the loaded model with its batching engine, the gallery, and hot reload.

Routes ask the runtime for embeddings and searches; they never hold a model themselves, so a hot reload is
one reference swap. Requests already running finish on the model they started with (the old engine drains
before it stops), and requests arriving after the swap use the new one: nothing in flight is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
from anyio import to_thread

from bundle.errors import BundleError
from service.core.config import Settings
from service.engine import BatchingEngine, BatchObserver, EngineClosedError
from service.errors import (
    InvalidBundleError,
    InvalidInputError,
    NotReadyError,
    SnapshotFailedError,
    SnapshotUnavailableError,
)
from service.gallery.gallery import Gallery, IndexFactory, Match
from service.gallery.index import ExactIndex
from service.gallery.snapshot import SnapshotError, SnapshotManifest, open_gallery, save_snapshot
from service.gallery.store import ChangeFeedStore, IdentityStore, open_store
from service.model import EmbeddingModel, RuntimeOptions
from service.preprocess import ImagePreprocessor

logger = logging.getLogger("idembed.runtime")

# Decoding a few small images costs tens of microseconds, less than a hop to a worker thread; large uploads
# (a 12 MP JPEG takes ~100 ms) would stall every other request on the event loop, so they go to a thread.
_INLINE_DECODE_BYTES = 256 * 1024
_INLINE_SEARCH_ROWS = 20_000


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

    @property
    def ready(self) -> bool:
        return self._current is not None and not self._current.engine.closing

    @property
    def current(self) -> LoadedModel:
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
        engine = BatchingEngine(
            model.run,
            max_batch_size=s.max_batch_size,
            batch_wait_ms=s.batch_wait_ms,
            max_queue_depth=s.max_queue_depth,
            observer=self._observer,
            inline_max_ms=s.inline_inference_max_ms,
            workers=s.inference_workers,
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

    def _index_factory(self, identify_threshold: float) -> IndexFactory:
        if self.settings.gallery_index == "exact":
            return ExactIndex
        # Imported only when asked for: the ANN module pulls in usearch.
        from service.gallery.ann import make_index

        # A graph search misses only probes whose beam never reached their identity, and those show up as a
        # best match below the known/unknown line; searching exactly those again with a wide beam lifts
        # recall@1 at 1M from ~0.95 to 0.999 at the small beam's p50 (docs/performance.md).
        return partial(make_index, self.settings.gallery_index, retry_below=identify_threshold)

    async def start(self) -> None:
        """Load, verify and warm the bundle, open the store, build the gallery; raise on any fault."""
        start = time.perf_counter()
        loaded = await to_thread.run_sync(self._load_model, self.bundle_path)
        store = await to_thread.run_sync(open_store, self.settings.store_url, loaded.model.dim)
        self._store = store
        bundle = loaded.model.bundle
        threshold = loaded.model.manifest.thresholds.default
        # From the snapshot (plus the store's changes since) when one fits, else rebuilt from the store; the
        # cursor is the point of the change feed the index reflects, where a follower carries on.
        opened = partial(
            open_gallery, self.settings.gallery_snapshot_path, index_factory=self._index_factory(threshold)
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

    async def reload(self, name: str | None) -> tuple[LoadedModel, str]:
        """Load, verify and warm a bundle, then swap it in; a bad bundle leaves the current model serving."""
        path = self.resolve_bundle(name)
        async with self._reload_lock:
            old = self.current
            try:
                new = await to_thread.run_sync(self._load_model, path)
            except BundleError as exc:
                raise InvalidBundleError(
                    f"bundle refused, still serving {old.model_id}: {exc.problem}",
                    detail={"file": exc.path.name, "problem": exc.problem},
                ) from exc
            if new.model.dim != self.gallery.dim:
                raise InvalidBundleError(
                    f"bundle refused, still serving {old.model_id}: it produces {new.model.dim}-d embeddings "
                    f"but the enrolled identities are {self.gallery.dim}-d",
                    detail={"embedding_dim": new.model.dim, "store_dim": self.gallery.dim},
                )
            new.engine.start()
            bundle = new.model.bundle
            self.gallery.set_centers(bundle.centers, bundle.labels)
            self._current = new
            self.bundle_path = path
            if self._on_model_change is not None:
                self._on_model_change(new.model_id)
        logger.info("model reloaded", extra={"model_id": new.model_id, "previous_model_id": old.model_id})
        # Requests that took the old engine before the swap are still queued on it: let it drain.
        await old.engine.stop(self.settings.shutdown_timeout_s)
        return new, old.model_id

    @property
    def default_threshold(self) -> float:
        """The bundle's calibrated threshold (similarity at the target false-accept rate)."""
        return self.current.model.manifest.thresholds.default

    async def search(self, vectors: np.ndarray, k: int) -> list[list[Match]]:
        gallery = self.gallery
        # Exact search over a few thousand vectors takes microseconds; a large gallery goes to a thread.
        if gallery.num_enrolled <= _INLINE_SEARCH_ROWS:
            return gallery.search(vectors, k)
        return await to_thread.run_sync(gallery.search, vectors, k)

    def check_embeddings(self, embeddings: list[list[float]], field_name: str) -> np.ndarray:
        """Client-supplied embeddings -> float32 [n, dim]; wrong dimension or all-zero vectors are refused."""
        dim = self.current.model.dim
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

    async def query_vectors(
        self, images: list[bytes] | None, embeddings: list[list[float]] | None
    ) -> tuple[np.ndarray, str]:
        """What a request searches or enrolls with: its images embedded, else its own embeddings checked."""
        if images is not None:
            return await self.embed_images(images)
        assert embeddings is not None  # the request schemas require one of the two
        return self.check_embeddings(embeddings, "embeddings"), self.current.model_id

    async def embed_images(self, images: list[bytes], field_name: str = "images") -> tuple[np.ndarray, str]:
        """Decode, preprocess and embed images in one engine call; returns (embeddings, model id)."""
        while True:
            loaded = self.current
            if sum(len(i) for i in images) <= _INLINE_DECODE_BYTES:
                inputs = loaded.preprocess(images, field=field_name)
            else:
                inputs = await to_thread.run_sync(partial(loaded.preprocess, images, field=field_name))
            try:
                return await loaded.engine.embed(inputs), loaded.model_id
            except EngineClosedError:
                # A hot reload swapped the model while this request was preprocessing: redo it on the new
                # one (its preprocessing may differ). Shutting down is the only other cause: then give up.
                if self._current is loaded or self._current is None:
                    raise
