"""The searchable gallery: the bundle's class centers plus enrolled identities, searched by cosine similarity.

Centers and enrolled identities live in two indexes: centers are few and replaced on every hot reload (exact
search), enrolled identities can be many (any `VectorIndex`, exact by default) and outlive reloads of the
same model. A query searches the sources it asks for and merges their top-k lists, so every match says
where it came from; `identify` returns them with the known/unknown decision (`recognition.Identification`).

Embeddings of two models are never compared. A gallery serves one model (`model_id`): its enrolled index
holds only identities that model embedded; identities another model enrolled stay in the store, unmatched
("orphaned") until they are re-enrolled. What one search reads (model, centers, enrolled index, names) is
one `GalleryView`, swapped whole when the served model changes, and a search that was handed embeddings of
another model than the view's raises `ModelChangedError` instead of scoring them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bundle.files import l2_normalize
from service.gallery.enrolled import EnrolledIndex
from service.gallery.index import ExactIndex, VectorIndex
from service.gallery.recognition import SOURCES, Identification, Match, Sources
from service.gallery.store import EnrolledIdentity, IdentityStore

IndexFactory = Callable[[int], VectorIndex]


class ModelChangedError(Exception):
    """The embeddings were made by another model than the one the gallery now serves (a reload swapped it
    in between): they must be embedded again, never scored against this model's identities."""

    def __init__(self, query_model: str, gallery_model: str | None) -> None:
        self.query_model = query_model
        self.gallery_model = gallery_model
        super().__init__(f"embeddings of {query_model} but the gallery serves {gallery_model}")


@dataclass(frozen=True)
class GalleryView:
    """Everything one search reads, replaced as a whole: a search never pairs one model's queries, centers
    or identities with another's. `model_id` None: a gallery not bound to a model (tools, benchmarks)."""

    model_id: str | None
    centers: ExactIndex
    labels: list[str]
    enrolled: EnrolledIndex


def centers_index(centers: np.ndarray, labels: list[str], dim: int) -> ExactIndex:
    centers = np.asarray(centers, dtype=np.float32)
    if centers.ndim != 2 or centers.shape[1] != dim or len(labels) != len(centers):
        raise ValueError(f"centers {centers.shape} and {len(labels)} labels do not fit a {dim}-d gallery")
    index = ExactIndex(dim, initial_capacity=max(1, len(centers)))
    index.add(np.arange(len(centers), dtype=np.int64), l2_normalize(centers))
    return index


def mean_embedding(embeddings: np.ndarray) -> np.ndarray:
    """Template of several images of one identity: the normalised mean of their normalised embeddings."""
    vectors = l2_normalize(np.asarray(embeddings, dtype=np.float32))
    return l2_normalize(vectors.mean(axis=0))


class Gallery:
    """Centers + enrolled identities behind `VectorIndex`es; enrollment is durable via an `IdentityStore`.

    `model_id` binds the gallery to the model serving it: only identities that model enrolled are indexed
    (None: every stored identity, for tools that serve no model). `switch_model` moves it to another model.
    """

    def __init__(
        self,
        centers: np.ndarray,
        labels: list[str],
        store: IdentityStore,
        *,
        model_id: str | None = None,
        index_factory: IndexFactory = ExactIndex,
        load_batch_size: int = 10_000,
    ) -> None:
        self._setup(store, model_id, centers, labels, index_factory(int(store.dim)), {})
        self._load(self._view, load_batch_size)

    @classmethod
    def with_index(
        cls,
        centers: np.ndarray,
        labels: list[str],
        store: IdentityStore,
        index: VectorIndex,
        names: dict[int, str],
        *,
        model_id: str | None = None,
    ) -> Gallery:
        """A gallery over an index already holding the store's identities of `model_id` (a snapshot brought
        up to date), `names` mapping each of its keys to the identity name; nothing is read from the store."""
        if index.dim != store.dim:
            raise ValueError(f"a {index.dim}-d index does not fit a store of {store.dim}-d embeddings")
        gallery = cls.__new__(cls)
        gallery._setup(store, model_id, centers, labels, index, dict(names))
        return gallery

    def _setup(
        self,
        store: IdentityStore,
        model_id: str | None,
        centers: np.ndarray,
        labels: list[str],
        index: VectorIndex,
        names: dict[int, str],
    ) -> None:
        self.dim = int(store.dim)
        self.store = store
        self._lock = threading.Lock()
        center_index = centers_index(centers, labels, self.dim)
        enrolled = EnrolledIndex(index, names, model_id=model_id)
        self._view = GalleryView(model_id, center_index, list(labels), enrolled)
        # A view being prepared for another model (`prepare_model`): writes are mirrored into it too, and
        # the keys they touch are noted, so a re-embedding can redo those at `commit_reembedded`.
        self._pending: GalleryView | None = None
        self._touched: set[int] = set()
        self._reembedded: dict[int, np.ndarray] = {}  # key -> new model's template, not yet stored

    def _load(self, view: GalleryView, batch_size: int) -> int:
        return view.enrolled.load(self.store, batch_size)

    @property
    def model_id(self) -> str | None:
        return self._view.model_id

    @property
    def view(self) -> GalleryView:
        return self._view

    def set_centers(self, centers: np.ndarray, labels: list[str]) -> None:
        """Replace the exported centers (a reload of the same model); enrolled identities are kept."""
        index = centers_index(centers, labels, self.dim)
        # One reference swap: a concurrent search never pairs new keys with old labels.
        self._view = replace(self._view, centers=index, labels=list(labels))

    def prepare_model(
        self,
        model_id: str,
        centers: np.ndarray,
        labels: list[str],
        index: VectorIndex,
        *,
        load_batch_size: int = 10_000,
    ) -> int:
        """Build the view of another model beside the served one: its centers and an index of the identities
        that model enrolled (usually none). Searches go on against the current view; writes wait while the
        store is read, then are mirrored into both views until `commit_model` or `abort_model`. Returns how
        many identities the new view holds."""
        enrolled = EnrolledIndex(index, model_id=model_id)
        view = GalleryView(model_id, centers_index(centers, labels, self.dim), list(labels), enrolled)
        with self._lock:
            loaded = self._load(view, load_batch_size)
            self._pending = view
            self._touched, self._reembedded = set(), {}
        return loaded

    def commit_model(self) -> None:
        """Serve the prepared view: one reference swap, so no search mixes the two models."""
        with self._lock:
            if self._pending is None:
                raise RuntimeError("no model view was prepared")
            self._view, self._pending = self._pending, None

    def abort_model(self) -> None:
        with self._lock:
            self._pending = None
            self._touched, self._reembedded = set(), {}

    def add_reembedded(self, records: list[EnrolledIdentity], templates: list[np.ndarray]) -> int:
        """Index in the prepared view the new model's templates of identities the served model enrolled
        (re-embedded from their kept images; the store still holds the old templates until
        `commit_reembedded`). Identities written since the view was prepared are left to the commit.
        Returns how many were added."""
        with self._lock:
            view = self._pending
            if view is None:
                raise RuntimeError("no model view was prepared")
            fresh = [(r, t) for r, t in zip(records, templates, strict=True) if r.key not in self._touched]
            view.enrolled.add_templates([r for r, _ in fresh], [t for _, t in fresh])
            self._reembedded.update((r.key, t) for r, t in fresh)
        return len(fresh)

    def commit_reembedded(
        self, from_model: str, embed: Callable[[list[list[bytes]]], list[np.ndarray | None]]
    ) -> tuple[int, int]:
        """Store the re-embedded templates and serve the prepared view, with writes held off meanwhile.

        Identities written while the view was prepared are settled first: deleted ones dropped, ones the
        new model enrolled kept, ones the old model (re-)enrolled re-embedded now with `embed` (their kept
        images -> templates, None where that failed) or, without images, left orphaned. Returns (identities
        whose templates were replaced, identities written meanwhile that were settled)."""
        with self._lock:
            view = self._pending
            if view is None or view.model_id is None:
                raise RuntimeError("no model view was prepared")
            touched = sorted(self._touched)
            current = self.store.get_by_keys(touched)
            redo = [current[k] for k in touched if k in current and current[k].model_id == from_model]
            images = self.store.images_of([r.key for r in redo])
            with_images = [r for r in redo if r.key in images]
            templates = embed([images[r.key] for r in with_images]) if with_images else []
            made = {r.key: t for r, t in zip(with_images, templates, strict=True) if t is not None}
            for key in touched:
                self._reembedded.pop(key, None)
                record = current.get(key)
                if record is not None and record.model_id == view.model_id:
                    view.enrolled.apply([record])
                elif key in made:
                    assert record is not None
                    view.enrolled.add_templates([record], [made[key]])
                    self._reembedded[key] = made[key]
                else:
                    view.enrolled.drop([key])
            updated = set(self.store.reembed(from_model, view.model_id, self._reembedded))
            # Not updated: deleted or re-enrolled by another replica since; never serve a stale template.
            lost = [k for k in self._reembedded if k not in updated]
            if lost:
                view.enrolled.drop(lost)
            self._view, self._pending = view, None
            self._touched, self._reembedded = set(), {}
        return len(updated), len(touched)

    def _views(self) -> list[GalleryView]:
        return [self._view] if self._pending is None else [self._view, self._pending]

    @contextmanager
    def frozen(self) -> Iterator[VectorIndex]:
        """The enrolled index with enrollments, deletions and followed changes held off, so it can be saved
        whole at one point of the store's change feed. Searches go on, except while the index's own lock is
        held by its save (0.3 s at 1M, docs/performance.md)."""
        with self._lock:
            yield self._view.enrolled.index

    @property
    def enrolled_index(self) -> VectorIndex:
        """The index of the served model's enrolled identities."""
        return self._view.enrolled.index

    @property
    def num_centers(self) -> int:
        return len(self._view.labels)

    @property
    def num_enrolled(self) -> int:
        """Identities this gallery matches (enrolled by its model)."""
        return len(self._view.enrolled)

    def enroll(
        self,
        name: str,
        embeddings: np.ndarray,
        *,
        model_id: str,
        metadata: dict[str, Any] | None = None,
        replace: bool = False,
        images: list[bytes] | None = None,
    ) -> tuple[EnrolledIdentity, bool]:
        """Store (durably, first) and index one identity from the embeddings of one or more of its images
        (kept with it when `images` are given, so that another model can re-embed it).

        Raises `ModelChangedError`, storing nothing, if `model_id` (the model that made the embeddings) is
        not the one the gallery serves: the caller embeds again with the served model."""
        template = mean_embedding(embeddings)
        with self._lock:
            served = self._view.model_id
            if served is not None and model_id != served:
                raise ModelChangedError(model_id, served)
            record, replaced = self.store.add(
                name,
                template,
                image_count=len(embeddings),
                model_id=model_id,
                metadata=metadata,
                replace=replace,
                images=images,
            )
            for view in self._views():
                view.enrolled.apply([record])
            if self._pending is not None:
                self._touched.add(record.key)
        return record, replaced

    def apply_changes(self, upserts: list[EnrolledIdentity], deleted: list[int]) -> None:
        """Apply identities written by another replica of a shared store (its change feed); idempotent.
        Identities another model enrolled (a replica still serving it) are not indexed here."""
        with self._lock:
            for view in self._views():
                view.enrolled.apply(upserts, deleted)
            if self._pending is not None:
                self._touched.update(r.key for r in upserts)
                self._touched.update(int(k) for k in deleted)

    def rebuild_enrolled(self, index_factory: IndexFactory, batch_size: int = 10_000) -> int:
        """Replace the served model's enrolled index with one rebuilt from the store (a follower that can no
        longer catch up from the change feed). Searches and writes go on meanwhile against the old index;
        the caller replays the feed from a cursor taken before this call, so writes made meanwhile land too.
        Returns how many identities the new index holds."""
        model_id = self._view.model_id
        fresh = EnrolledIndex(index_factory(self.dim), model_id=model_id)
        loaded = fresh.load(self.store, batch_size)
        with self._lock:
            if self._view.model_id == model_id:  # a reload swapped models meanwhile: its view is fresh
                self._view = replace(self._view, enrolled=fresh)
        return loaded

    def delete(self, name: str) -> EnrolledIdentity | None:
        with self._lock:
            record = self.store.delete(name)
            if record is not None:
                for view in self._views():
                    view.enrolled.drop([record.key])
                if self._pending is not None:
                    self._touched.add(record.key)
        return record

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        sources: Sources = "both",
        retry_below: float | None = None,
        model_id: str | None = None,
    ) -> list[list[Match]]:
        """Top-k matches per query over the chosen sources, best first.

        `retry_below` is passed to the enrolled index (an HNSW graph searches weak matches again against this
        line); `model_id`, the model that made `queries`, is checked against the served one."""
        view = self._view  # read once: a model switch replaces it whole
        if model_id is not None and view.model_id is not None and model_id != view.model_id:
            raise ModelChangedError(model_id, view.model_id)
        if sources not in SOURCES:
            raise ValueError(f"sources must be one of {', '.join(SOURCES)}, got {sources!r}")
        queries = l2_normalize(np.asarray(queries, dtype=np.float32))
        results: list[list[Match]] = [[] for _ in range(len(queries))]
        if sources in ("centers", "both") and view.labels:
            c_sims, c_keys = view.centers.search(queries, min(k, len(view.labels)))
            for qi, row in enumerate(results):
                row.extend(
                    Match(view.labels[key], float(sim), "center")
                    for sim, key in zip(c_sims[qi], c_keys[qi], strict=True)
                    if key >= 0
                )
        if sources in ("enrolled", "both"):
            e_sims, e_keys = view.enrolled.index.search(queries, k, retry_below=retry_below)
            names = view.enrolled.names
            # Reduced-precision ANN storage (f16/i8) can give 1.0001 for an exact match: keep cosine's range.
            e_sims = np.clip(e_sims, -1.0, 1.0)
            for qi, row in enumerate(results):
                for sim, key in zip(e_sims[qi], e_keys[qi], strict=True):
                    name = names.get(int(key))
                    # A key removed between search and lookup (concurrent delete) is simply dropped.
                    if key >= 0 and name is not None:
                        row.append(Match(name, float(sim), "enrolled"))
        for row in results:
            row.sort(key=lambda m: m.similarity, reverse=True)
            del row[k:]
        return results

    def identify(
        self,
        queries: np.ndarray,
        k: int,
        *,
        threshold: float,
        sources: Sources,
        model_id: str | None = None,
    ) -> list[Identification]:
        """Top-k per query over `sources` and the known/unknown decision against `threshold` (the served
        bundle's calibrated one or the request's); the same line decides which graph matches are retried."""
        matches = self.search(queries, k, sources=sources, retry_below=threshold, model_id=model_id)
        return [Identification(row, threshold) for row in matches]
