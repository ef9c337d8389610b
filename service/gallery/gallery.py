"""The searchable gallery: the bundle's class centers plus enrolled identities, searched by cosine similarity.

Centers and enrolled identities live in two indexes: centers are few and replaced on every hot reload (exact
search), enrolled identities can be many (any `VectorIndex`, exact by default) and outlive model reloads.
A query searches both and merges the two top-k lists, so every match says where it came from.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bundle.files import l2_normalize
from service.gallery.index import ExactIndex, VectorIndex
from service.gallery.store import EnrolledIdentity, IdentityStore

Source = Literal["center", "enrolled"]
IndexFactory = Callable[[int], VectorIndex]


@dataclass(frozen=True)
class Match:
    name: str
    similarity: float
    source: Source


def mean_embedding(embeddings: np.ndarray) -> np.ndarray:
    """Template of several images of one identity: the normalised mean of their normalised embeddings."""
    vectors = l2_normalize(np.asarray(embeddings, dtype=np.float32))
    return l2_normalize(vectors.mean(axis=0))


class Gallery:
    """Centers + enrolled identities behind `VectorIndex`es; enrollment is durable via an `IdentityStore`."""

    def __init__(
        self,
        centers: np.ndarray,
        labels: list[str],
        store: IdentityStore,
        *,
        index_factory: IndexFactory = ExactIndex,
        load_batch_size: int = 10_000,
    ) -> None:
        self._setup(centers, labels, store, index_factory(int(store.dim)), {})
        for batch in store.iter_all(load_batch_size):
            self._index_records(batch)

    @classmethod
    def with_index(
        cls,
        centers: np.ndarray,
        labels: list[str],
        store: IdentityStore,
        index: VectorIndex,
        names: dict[int, str],
    ) -> Gallery:
        """A gallery over an index already holding the store's identities (a snapshot brought up to date),
        `names` mapping each of its keys to the identity name; nothing is read from the store."""
        if index.dim != store.dim:
            raise ValueError(f"a {index.dim}-d index does not fit a store of {store.dim}-d embeddings")
        gallery = cls.__new__(cls)
        gallery._setup(centers, labels, store, index, dict(names))
        return gallery

    def _setup(
        self,
        centers: np.ndarray,
        labels: list[str],
        store: IdentityStore,
        index: VectorIndex,
        names: dict[int, str],
    ) -> None:
        self.dim = int(store.dim)
        self.store = store
        self._lock = threading.Lock()
        self._names = names
        self._enrolled = index
        self.set_centers(centers, labels)

    def set_centers(self, centers: np.ndarray, labels: list[str]) -> None:
        """Replace the exported centers (start-up and hot reload); enrolled identities are kept."""
        centers = np.asarray(centers, dtype=np.float32)
        if centers.ndim != 2 or centers.shape[1] != self.dim or len(labels) != len(centers):
            raise ValueError(
                f"centers {centers.shape} and {len(labels)} labels do not fit a {self.dim}-d gallery"
            )
        index = ExactIndex(self.dim, initial_capacity=max(1, len(centers)))
        index.add(np.arange(len(centers), dtype=np.int64), l2_normalize(centers))
        # Swap both together so a concurrent search never pairs new keys with old labels.
        self._centers, self._labels = index, list(labels)

    def _index_records(self, records: list[EnrolledIdentity]) -> None:
        if not records:
            return
        keys = np.array([r.key for r in records], dtype=np.int64)
        self._enrolled.add(keys, np.stack([r.embedding for r in records]))
        for r in records:
            self._names[r.key] = r.name

    @contextmanager
    def frozen(self) -> Iterator[VectorIndex]:
        """The enrolled index with enrollments, deletions and followed changes held off, so it can be saved
        whole at one point of the store's change feed. Searches go on, except while the index's own lock is
        held by its save (0.3 s at 1M, docs/performance.md)."""
        with self._lock:
            yield self._enrolled

    @property
    def num_centers(self) -> int:
        return len(self._labels)

    @property
    def num_enrolled(self) -> int:
        return len(self._enrolled)

    def enroll(
        self,
        name: str,
        embeddings: np.ndarray,
        *,
        model_id: str,
        metadata: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> tuple[EnrolledIdentity, bool]:
        """Store (durably, first) and index one identity from the embeddings of one or more of its images."""
        template = mean_embedding(embeddings)
        with self._lock:
            record, replaced = self.store.add(
                name,
                template,
                image_count=len(embeddings),
                model_id=model_id,
                metadata=metadata,
                replace=replace,
            )
            self._index_records([record])
        return record, replaced

    def apply_changes(self, upserts: list[EnrolledIdentity], deleted: list[int]) -> None:
        """Apply identities written by another replica of a shared store (its change feed); idempotent."""
        with self._lock:
            self._index_records(upserts)
            if deleted:
                self._enrolled.remove(np.asarray(deleted, dtype=np.int64))
                for key in deleted:
                    self._names.pop(int(key), None)

    def delete(self, name: str) -> EnrolledIdentity | None:
        with self._lock:
            record = self.store.delete(name)
            if record is not None:
                self._enrolled.remove(np.array([record.key], dtype=np.int64))
                self._names.pop(record.key, None)
        return record

    def search(self, queries: np.ndarray, k: int) -> list[list[Match]]:
        """Top-k matches per query over centers and enrolled identities, best first."""
        queries = l2_normalize(np.asarray(queries, dtype=np.float32))
        centers, labels = self._centers, self._labels
        c_sims, c_keys = centers.search(queries, min(k, max(1, len(labels))))
        e_sims, e_keys = self._enrolled.search(queries, k)
        # Reduced-precision ANN storage (f16/i8) can report 1.0001 for an exact match: keep cosine's range.
        e_sims = np.clip(e_sims, -1.0, 1.0)
        results: list[list[Match]] = []
        for qi in range(len(queries)):
            matches = [
                Match(labels[key], float(sim), "center")
                for sim, key in zip(c_sims[qi], c_keys[qi], strict=True)
                if key >= 0
            ]
            for sim, key in zip(e_sims[qi], e_keys[qi], strict=True):
                name = self._names.get(int(key))
                # A key removed between search and lookup (concurrent delete) is simply dropped.
                if key >= 0 and name is not None:
                    matches.append(Match(name, float(sim), "enrolled"))
            matches.sort(key=lambda m: m.similarity, reverse=True)
            results.append(matches[:k])
        return results
