"""The service's composition root: a model slot (`service.model_slot`) and a gallery service
(`service.gallery.service`), started and stopped together, and the operations that need both.

Identify, enroll and verify embed with the served model, then search or store with the gallery that serves
that same model; a reload loads the new model in the slot, lets the gallery service check and prepare the
change, and swaps both at once. Routes call this object; they never hold a model or a store themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bundle.errors import BundleError
from service.core.config import Settings
from service.engine import BatchObserver
from service.errors import InvalidBundleError, InvalidInputError, ModelChangeRefusedError, NotReadyError
from service.gallery.gallery import Gallery, ModelChangedError
from service.gallery.recognition import Identification, Sources, Verification, decision_threshold, verify
from service.gallery.service import GalleryService, ReembedJob, Templates
from service.gallery.snapshot import SnapshotManifest
from service.gallery.store import EnrolledIdentity
from service.model_slot import LoadedModel, ModelSlot, embed_templates
from service.offload import in_thread

logger = logging.getLogger("idembed.runtime")

# A request whose embeddings were made by a model that a reload has just replaced is embedded again with the
# new one; reloads are seconds apart at the very least, so a third swap within one request means trouble.
_MODEL_CHANGE_RETRIES = 3


@dataclass(frozen=True)
class ReloadResult:
    model: LoadedModel
    previous_model_id: str
    orphaned: int  # identities of the previous model left unmatched by this reload (forced)
    job: ReembedJob | None = None  # set: the swap waits for this background re-embedding


@dataclass(frozen=True)
class IdentifyResult:
    results: list[Identification]
    model_id: str  # the model that made the query embeddings and whose identities were searched
    threshold: float
    sources: Sources


@dataclass(frozen=True)
class VerifyResult:
    verification: Verification
    model_id: str  # the model that embedded both sides


class ServiceRuntime:
    """Owns the model slot and the gallery service of one app; `start`/`stop` are called by the lifespan."""

    def __init__(
        self,
        settings: Settings,
        observer: BatchObserver | None = None,
        on_model_change: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.models = ModelSlot(settings, observer, on_model_change)
        self.galleries = GalleryService(settings)
        self.models.serving_model_id = self._gallery_model_id
        self._reload_lock = asyncio.Lock()
        self.bundle_path = settings.bundle_path
        self.startup_error: str | None = None
        self.job: ReembedJob | None = None
        self._job_task: asyncio.Task[None] | None = None

    def _gallery_model_id(self) -> str | None:
        return self.galleries.gallery.model_id if self.galleries.loaded else None

    @property
    def ready(self) -> bool:
        """A verified, warm model serves (and is not shutting down)."""
        return self.models.ready

    def readiness(self) -> str | None:
        """Why this process should not get traffic now (None: it should)."""
        if not self.models.ready:
            return self.startup_error or "the model is not loaded, or the service is shutting down"
        return self.galleries.problem

    @property
    def current(self) -> LoadedModel:
        """The model serving requests: the one whose identities the gallery searches."""
        return self.models.current

    @property
    def gallery(self) -> Gallery:
        return self.galleries.gallery

    @property
    def default_threshold(self) -> float:
        """The served bundle's calibrated threshold (similarity at the target false-accept rate)."""
        return self.current.threshold

    def _templates(self, loaded: LoadedModel) -> Templates:
        batch_size = self.settings.max_batch_size
        return lambda groups: embed_templates(loaded, groups, batch_size)

    async def start(self) -> None:
        """Load, verify and warm the bundle, open the store, build the gallery; raise on any fault."""
        start = time.perf_counter()
        loaded = await in_thread(self.models.load, self.bundle_path)
        bundle = loaded.model.bundle
        opened, orphaned = await in_thread(
            self.galleries.open,
            loaded.served,
            loaded.model.dim,
            bundle.centers,
            bundle.labels,
            self._templates(loaded),
        )
        self.models.swap(loaded)
        logger.info(
            "model loaded",
            extra={
                "model_id": loaded.model_id,
                "bundle": str(self.bundle_path),
                "centers": opened.gallery.num_centers,
                "enrolled": opened.gallery.num_enrolled,
                "orphaned": orphaned,
                "gallery_source": opened.source,
                "warmup_ms": round(loaded.model.warmup_ms, 2),
                "startup_ms": round((time.perf_counter() - start) * 1000, 1),
            },
        )

    async def stop(self) -> None:
        """Finish queued batches, stop following changes, snapshot the gallery (if set), close the store."""
        if self.job is not None and self._job_task is not None and not self._job_task.done():
            self.job.cancelled = True  # the old model keeps the gallery; the job ends at its next batch
            await self._job_task
        await self.models.stop()
        await self.galleries.close()

    async def write_snapshot(self) -> SnapshotManifest:
        """Save the gallery index into IDEMBED_GALLERY_SNAPSHOT_PATH (admin endpoint)."""
        return await self.galleries.write_snapshot()

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
                new = await in_thread(self.models.load, path)
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
            change = await self.galleries.plan_change(old.model_id, new.served)
            if change.orphaned and not force:
                kept_note = (
                    f" ({change.reembeddable} with kept images would be re-embedded; the others were "
                    "enrolled from embeddings or before images were kept)"
                    if self.settings.keep_enrollment_images
                    else ""
                )
                raise ModelChangeRefusedError(
                    f"reload refused, still serving {old.model_id}: {new.model_id} would orphan "
                    f"{change.orphaned} identities enrolled by {old.model_id} (their embeddings are not "
                    f"comparable with the new model's, so they would never match until re-enrolled)"
                    f"{kept_note}; send force=true to reload anyway",
                    detail={
                        "orphaned": change.orphaned,
                        "reembeddable": change.reembeddable,
                        "model_id": new.model_id,
                        "serving_model_id": old.model_id,
                        "enrolled_by_model": change.counts,
                    },
                )
            if change.reembeddable:
                job = ReembedJob(
                    new.model_id, old.model_id, total=change.reembeddable, without_images=change.orphaned
                )
                self.job = job
                self._job_task = asyncio.create_task(self._run_reembedding(new, old, path, job))
                logger.info(
                    "re-embedding the gallery before the reload",
                    extra={
                        "model_id": new.model_id,
                        "identities": change.reembeddable,
                        "orphaned": change.orphaned,
                    },
                )
                return ReloadResult(new, old.model_id, change.orphaned, job)
            bundle = new.model.bundle
            switching = new.model_id != gallery.model_id
            if switching:
                await self.galleries.prepare_model(new.model_id, bundle.centers, bundle.labels)
            # From here to the swap nothing awaits: no request sees the new gallery with the old model.
            if switching:
                gallery.commit_model()
            else:
                gallery.set_centers(bundle.centers, bundle.labels)
            self.models.swap(new)
            self.bundle_path = path
            await self.galleries.record_served(new.served)
        logger.info(
            "model reloaded",
            extra={"model_id": new.model_id, "previous_model_id": old.model_id, "orphaned": change.at_risk},
        )
        # Requests that took the old engine before the swap are still queued on it: let it drain.
        await self.models.drain(old)
        return ReloadResult(new, old.model_id, change.at_risk)

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
        started = time.perf_counter()
        embed = self._templates(new)
        async with self._reload_lock:
            gallery = self.gallery
            bundle = new.model.bundle
            staged = False
            try:
                await self.galleries.prepare_model(new.model_id, bundle.centers, bundle.labels)
                await self.galleries.reembed(job, embed)
                if job.cancelled:
                    raise RuntimeError("cancelled: the service is shutting down")
                self.models.stage(new)  # `current` follows the gallery from the moment the commit swaps it
                staged = True
                replaced, settled = await self.galleries.commit_reembedded(old.model_id, embed)
            except Exception as exc:
                gallery.abort_model()
                self.models.unstage()
                if staged:
                    await self.models.drain(new)
                job.state, job.error, job.finished_at = "failed", str(exc), datetime.now(UTC)
                logger.error(
                    "re-embedding for %s failed, still serving %s: %s", new.model_id, old.model_id, exc
                )
                return
            self.models.swap(new)
            self.bundle_path = path
            await self.galleries.record_served(new.served)
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
        await self.models.drain(old)

    async def identify(
        self,
        images: list[bytes] | None,
        embeddings: list[list[float]] | None,
        *,
        top_k: int,
        threshold: float | None = None,
        sources: Sources | None = None,
    ) -> IdentifyResult:
        """Embed (or check) the queries and identify them against the served model's gallery, at the
        request's threshold, else the calibrated one of the bundle that embedded the queries."""
        scope: Sources = sources or self.settings.identify_sources
        for _ in range(_MODEL_CHANGE_RETRIES):
            vectors, loaded = await self._query_vectors(images, embeddings)
            line = decision_threshold(threshold, loaded.threshold)
            try:
                results = await self.galleries.identify(
                    vectors, top_k, threshold=line, sources=scope, model_id=loaded.model_id
                )
            except ModelChangedError:
                continue  # a reload swapped the model after these were embedded: embed them again
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
            try:
                return await self.galleries.enroll(
                    name, vectors, model_id=loaded.model_id, images=images, metadata=metadata, replace=replace
                )
            except ModelChangedError:
                continue
        raise NotReadyError("the served model changed several times during this request; retry it")

    async def verify(
        self, sides: list[tuple[str, bytes | None, list[float] | None]], threshold: float | None
    ) -> VerifyResult:
        """Whether two faces, each an image or an embedding (`name`, image, embedding), are the same identity;
        both images go to the model in one call. The threshold is the request's, else the calibrated one of
        the bundle that embedded them."""
        to_embed = [image for _, image, emb in sides if emb is None and image is not None]
        loaded = self.current
        embedded_rows = iter(())
        if to_embed:
            embedded, loaded = await self.models.embed(to_embed, field_name="image")
            embedded_rows = iter(embedded)
        vectors = []
        for side, _, emb in sides:
            if emb is None:
                vectors.append(next(embedded_rows))
            else:
                vectors.append(self.check_embeddings([emb], f"embedding_{side}", loaded)[0])
        line = decision_threshold(threshold, loaded.threshold)
        return VerifyResult(verify(vectors[0], vectors[1], line), loaded.model_id)

    async def orphaned(self) -> int:
        """Stored identities the served model does not match (enrolled by another model)."""
        return await self.galleries.orphaned(self.current.model_id)

    def check_embeddings(
        self, embeddings: list[list[float]], field_name: str, loaded: LoadedModel | None = None
    ) -> np.ndarray:
        return self.models.check_embeddings(embeddings, field_name, loaded)

    async def _query_vectors(
        self, images: list[bytes] | None, embeddings: list[list[float]] | None
    ) -> tuple[np.ndarray, LoadedModel]:
        """What a request searches or enrolls with: its images embedded, else its own embeddings checked;
        with the model that embedded them (for client embeddings, the one served now)."""
        if images is not None:
            return await self.models.embed(images)
        assert embeddings is not None  # the request schemas require one of the two
        loaded = self.current
        return self.check_embeddings(embeddings, "embeddings", loaded), loaded

    async def embed_images(self, images: list[bytes], field_name: str = "images") -> tuple[np.ndarray, str]:
        """Decode, preprocess and embed images in one engine call; returns (embeddings, model id)."""
        vectors, loaded = await self.models.embed(images, field_name)
        return vectors, loaded.model_id
