"""Vector index interface for cosine search over L2-normalised vectors, and the exact (numpy) implementation.

Keys are int64 chosen by the caller (the gallery maps them to identities). Vectors must already be
L2-normalised so that inner product == cosine similarity. ANN implementations live beside this module and
follow the same `VectorIndex` protocol, so the gallery can switch between them by configuration.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class VectorIndex(Protocol):
    dim: int

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace `vectors` [n, dim] under `keys` [n] (int64)."""

    def remove(self, keys: np.ndarray) -> None:
        """Drop these keys; unknown keys are ignored."""

    def search(
        self, queries: np.ndarray, k: int, *, retry_below: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine: (similarities [q, k] float32, descending; keys [q, k] int64, -1 pads).

        `retry_below` is the caller's known/unknown line for this search: an approximate index may search a
        query again, harder, when its best match falls below it; an exact index has nothing to retry."""

    def __len__(self) -> int: ...


PAD_KEY = -1  # fills search results shorter than k; so no caller may use it as a key


def as_keys(keys: np.ndarray) -> np.ndarray:
    """Validate caller keys: a flat contiguous int64 array without the reserved padding key."""
    k = np.ascontiguousarray(np.asarray(keys, dtype=np.int64).reshape(-1))
    if np.any(k == PAD_KEY):
        raise ValueError("key -1 is reserved as the padding key of search results; use another key")
    return k


def as_vectors(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Validate vectors: contiguous float32 `[n, dim]` (a single `[dim]` vector becomes `[1, dim]`)."""
    v = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2 or v.shape[1] != dim:
        raise ValueError(f"expected vectors of shape [n, {dim}], got {tuple(v.shape)}")
    return v


class ExactIndex:
    """Brute-force inner product with numpy: exact, no build step, right for small galleries.

    Storage grows by doubling so that incremental `add` is amortised O(1) rather than a full copy each time;
    `remove` swaps the last row into the hole (O(1) per key).
    """

    def __init__(self, dim: int, initial_capacity: int = 1024) -> None:
        self.dim = int(dim)
        self._vectors = np.zeros((max(1, initial_capacity), self.dim), dtype=np.float32)
        self._keys = np.zeros(max(1, initial_capacity), dtype=np.int64)
        self._row_of: dict[int, int] = {}
        self._n = 0
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return self._n

    def _grow(self, need: int) -> None:
        cap = self._vectors.shape[0]
        if need <= cap:
            return
        new_cap = max(need, cap * 2)
        vectors = np.zeros((new_cap, self.dim), dtype=np.float32)
        vectors[: self._n] = self._vectors[: self._n]
        keys = np.zeros(new_cap, dtype=np.int64)
        keys[: self._n] = self._keys[: self._n]
        self._vectors, self._keys = vectors, keys

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = as_keys(keys)
        vectors = as_vectors(vectors, self.dim)
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys for {len(vectors)} vectors")
        with self._lock:
            self._grow(self._n + len(keys))
            for key, vec in zip(keys.tolist(), vectors, strict=True):
                row = self._row_of.get(key)
                if row is None:
                    row = self._n
                    self._n += 1
                    self._row_of[key] = row
                    self._keys[row] = key
                self._vectors[row] = vec

    def remove(self, keys: np.ndarray) -> None:
        with self._lock:
            for key in as_keys(keys).tolist():
                row = self._row_of.pop(key, None)
                if row is None:
                    continue
                last = self._n - 1
                if row != last:
                    moved = int(self._keys[last])
                    self._vectors[row] = self._vectors[last]
                    self._keys[row] = moved
                    self._row_of[moved] = row
                self._n = last

    def search(
        self, queries: np.ndarray, k: int, *, retry_below: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        del retry_below  # exact search never misses, so there is nothing to search again
        q = as_vectors(queries, self.dim)
        if k < 1:
            raise ValueError("k must be >= 1")
        with self._lock:
            n = self._n
            sims_out = np.full((len(q), k), -np.inf, dtype=np.float32)
            keys_out = np.full((len(q), k), PAD_KEY, dtype=np.int64)
            if n == 0:
                return sims_out, keys_out
            scores = q @ self._vectors[:n].T  # [q, n]
            kk = min(k, n)
            if kk < n:
                top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            else:
                top = np.broadcast_to(np.arange(n), (len(q), n))
            top_scores = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            sims_out[:, :kk] = np.take_along_axis(top_scores, order, axis=1)
            keys_out[:, :kk] = self._keys[top]
        return sims_out, keys_out
