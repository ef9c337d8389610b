"""Approximate (HNSW) vector index for galleries of millions, and `make_index` to pick exact, HNSW or auto.

Why usearch and not faiss (measured with `bench/identify_bench.py`, see docs/performance.md): at equal recall
the two have similar single-query latency, but faiss' HNSW cannot delete vectors (`remove_ids` is unsupported
for `IndexHNSWFlat`), so every un-enrollment would mean a full rebuild; usearch removes a key in place and
keeps the graph searchable. usearch also stores vectors quantised (f16 / i8) with no measurable loss of
recall@1 at 100k x 128-d.

All vectors are L2-normalised by the caller, so the index uses the inner-product metric and reports
`similarity = 1 - distance` (usearch's "ip" distance is `1 - dot`).
"""

from __future__ import annotations

import os
import threading
from typing import Literal

import numpy as np
from usearch.index import BatchMatches, Index, Matches, MetricKind

from service.gallery.index import PAD_KEY, ExactIndex, VectorIndex, as_keys, as_vectors

IndexKind = Literal["exact", "hnsw", "auto"]
INDEX_KINDS: tuple[str, ...] = ("exact", "hnsw", "auto")
StorageDtype = Literal["f32", "f16", "bf16", "i8"]
STORAGE_DTYPES: tuple[str, ...] = ("f32", "f16", "bf16", "i8")

# Defaults chosen by measurement at 1M x 128-d on clustered vectors (docs/performance.md): with M=16 and
# expansion_search 256, recall@1 is 0.92 alone and 1.000 with retry_below set to the identify threshold, at
# p50 1.6 ms; without the retry, 0.99 needs expansion_search ~1500 (p50 ~9 ms). M=32 bought no recall at
# equal expansion_search at 100k and costs 40% more memory; expansion_add 128 is usearch's own default.
DEFAULT_CONNECTIVITY = 16
DEFAULT_EXPANSION_ADD = 128
DEFAULT_EXPANSION_SEARCH = 256
DEFAULT_DTYPE: StorageDtype = "f16"
# Beam for the second search of a query whose best match fell below `retry_below` (off unless set).
DEFAULT_RETRY_EXPANSION = 2048
# Below this many vectors exact numpy search is as fast as HNSW and has perfect recall (measured crossover,
# docs/performance.md), so the "auto" index only starts answering from the graph above it.
DEFAULT_AUTO_THRESHOLD = 20_000

_HNSW_OPTIONS = (
    "connectivity",
    "expansion_add",
    "expansion_search",
    "dtype",
    "threads",
    "retry_below",
    "retry_expansion",
)

# usearch also reserves the all-ones key (uint64 max, i.e. int64 -1 == PAD_KEY) as its "free slot" marker:
# one more reason `as_keys` refuses it.


def _last_occurrence(keys: np.ndarray) -> np.ndarray:
    """Row positions that keep only the last vector given for each key (a batch may repeat a key)."""
    _, first_in_reversed = np.unique(keys[::-1], return_index=True)
    return np.sort(len(keys) - 1 - first_in_reversed)


class HnswIndex:
    """usearch HNSW graph under the `VectorIndex` protocol: incremental add, replace and remove.

    `add` with a key that is already present replaces its vector (remove, then insert: usearch refuses
    duplicate keys). `remove` of unknown keys is a no-op. One lock serialises every call: usearch may grow its
    storage during `add`, which is not safe against a concurrent search, and a single query takes well under a
    millisecond, so the lock costs nothing measurable at service request rates.
    """

    def __init__(
        self,
        dim: int,
        *,
        connectivity: int = DEFAULT_CONNECTIVITY,
        expansion_add: int = DEFAULT_EXPANSION_ADD,
        expansion_search: int = DEFAULT_EXPANSION_SEARCH,
        dtype: StorageDtype = DEFAULT_DTYPE,
        threads: int = 1,
        retry_below: float | None = None,
        retry_expansion: int = DEFAULT_RETRY_EXPANSION,
    ) -> None:
        if dim < 1:
            raise ValueError(f"index dim must be >= 1, got {dim}")
        for option, value in (
            ("connectivity", connectivity),
            ("expansion_add", expansion_add),
            ("expansion_search", expansion_search),
            ("threads", threads),
            ("retry_expansion", retry_expansion),
        ):
            if value < 1:
                raise ValueError(f"HNSW option {option} must be >= 1, got {value}")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"HNSW option dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
        self.dim = int(dim)
        self.threads = int(threads)
        self._set_retry(retry_below, retry_expansion)
        self._index = Index(
            ndim=self.dim,
            metric="ip",
            dtype=dtype,
            connectivity=connectivity,
            expansion_add=expansion_add,
            expansion_search=expansion_search,
        )
        self._lock = threading.Lock()

    def _set_retry(self, retry_below: float | None, retry_expansion: int) -> None:
        if retry_below is not None and not -1.0 <= retry_below <= 1.0:
            raise ValueError(f"HNSW option retry_below must be a cosine in [-1, 1], got {retry_below}")
        if retry_expansion < 1:
            raise ValueError(f"HNSW option retry_expansion must be >= 1, got {retry_expansion}")
        self.retry_below = None if retry_below is None else float(retry_below)
        self.retry_expansion = int(retry_expansion)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def expansion_search(self) -> int:
        return int(self._index.expansion_search)

    @expansion_search.setter
    def expansion_search(self, value: int) -> None:
        # Tunable at run time: the graph does not depend on it, only how many candidates a search visits.
        if value < 1:
            raise ValueError(f"HNSW option expansion_search must be >= 1, got {value}")
        with self._lock:
            self._index.expansion_search = int(value)

    @property
    def memory_bytes(self) -> int:
        """Bytes usearch holds for vectors and graph (its own accounting, including reserved capacity)."""
        return int(self._index.memory_usage)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write graph and vectors to one file: reloading is far faster than re-inserting (minutes at 1M).

        Removed vectors are overwritten first, so the file holds no byte of a deleted identity's vector."""
        with self._lock:
            self._scrub_removed()
            self._index.save(os.fspath(path))

    def _scrub_removed(self) -> None:
        # usearch's remove only marks a slot free: the vector's bytes stay in memory, and in every saved file,
        # until an add reuses the slot. Adds fill free slots before growing, so adding one placeholder per
        # free slot and removing them again overwrites every removed vector with the same constant vector
        # (tested by scanning the file, tests/service/test_erasure.py). Cost: one insert per free slot.
        free = int(self._index.stats.nodes) - len(self._index)
        if free <= 0:
            return
        # Placeholder keys from the top of the int64 key space viewed as uint64 (negative int64 keys), which
        # the stores never assign; any that happen to be present are skipped.
        candidates = np.uint64(2**63) + np.arange(free * 2, dtype=np.uint64)
        taken = np.asarray(self._index.contains(candidates), dtype=bool).reshape(-1)
        keys = candidates[~taken][:free]
        filler = np.full((len(keys), self.dim), 1.0 / np.sqrt(self.dim), dtype=np.float32)
        self._index.add(keys, filler, threads=self.threads)
        self._index.remove(keys)

    def graph_options(self) -> dict[str, object]:
        """The options the graph file depends on; search-time options (expansion_search, retry) do not."""
        return {
            "connectivity": int(self._index.connectivity),
            "expansion_add": int(self._index.expansion_add),
            "dtype": str(self._index.dtype).rsplit(".", 1)[-1].lower(),
        }

    def keys(self) -> np.ndarray:
        """Every key in the index (int64), in no particular order."""
        with self._lock:
            return np.asarray(self._index.keys, dtype=np.uint64).view(np.int64)

    def restored(self, path: str | os.PathLike[str]) -> HnswIndex:
        """The graph saved at `path`, searched with this index's run-time options (beam, threads, retry)."""
        return HnswIndex.load(
            path,
            self.dim,
            expansion_search=self.expansion_search,
            threads=self.threads,
            retry_below=self.retry_below,
            retry_expansion=self.retry_expansion,
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        dim: int,
        *,
        expansion_search: int = DEFAULT_EXPANSION_SEARCH,
        threads: int = 1,
        retry_below: float | None = None,
        retry_expansion: int = DEFAULT_RETRY_EXPANSION,
    ) -> HnswIndex:
        """Read a file written by `save`; refuses one of another dimension or metric, naming the file."""
        path = os.fspath(path)
        try:
            meta = Index.metadata(path)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{path}: not a usearch index file ({exc})") from exc
        if meta is None:
            raise ValueError(f"{path}: not a usearch index file")
        if int(meta["dimensions"]) != dim or meta["kind_metric"] != MetricKind.IP:
            raise ValueError(
                f"{path}: holds a {meta['dimensions']}-d {meta['kind_metric'].name} index, "
                f"expected {dim}-d inner product"
            )
        restored = Index.restore(path)
        if restored is None:
            raise ValueError(f"{path}: not a usearch index file")
        index = cls.__new__(cls)
        index.dim = int(dim)
        index.threads = int(threads)
        index._set_retry(retry_below, retry_expansion)
        index._index = restored
        index._lock = threading.Lock()
        index.expansion_search = expansion_search  # not stored in the file
        return index

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = as_keys(keys)
        vectors = as_vectors(vectors, self.dim)
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys for {len(vectors)} vectors")
        if len(keys) == 0:
            return
        keep = _last_occurrence(keys)
        if len(keep) != len(keys):
            keys, vectors = keys[keep], vectors[keep]
        ukeys = keys.view(np.uint64)
        with self._lock:
            present = np.asarray(self._index.contains(ukeys), dtype=bool).reshape(-1)
            if present.any():
                self._index.remove(ukeys[present])
            self._index.add(ukeys, vectors, threads=self.threads)

    def remove(self, keys: np.ndarray) -> None:
        keys = as_keys(keys)
        if len(keys) == 0:
            return
        with self._lock:
            self._index.remove(keys.view(np.uint64))

    def search(
        self, queries: np.ndarray, k: int, *, retry_below: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine. A query whose best match is below `retry_below` (this call's known/unknown line;
        default: the index's own `retry_below`, off unless set) is searched again with `retry_expansion`."""
        q = as_vectors(queries, self.dim)
        if k < 1:
            raise ValueError("k must be >= 1")
        if retry_below is None:
            retry_below = self.retry_below
        elif not -1.0 <= retry_below <= 1.0:
            raise ValueError(f"retry_below must be a cosine in [-1, 1], got {retry_below}")
        sims_out = np.full((len(q), k), -np.inf, dtype=np.float32)
        keys_out = np.full((len(q), k), PAD_KEY, dtype=np.int64)
        with self._lock:
            if len(self._index) == 0 or len(q) == 0:
                return sims_out, keys_out
            self._fill(self._index.search(q, k, threads=self.threads), sims_out, keys_out)
            if retry_below is not None:
                # A probe of an enrolled person whose best match is below the threshold is usually a graph
                # miss (the beam never reached the person's neighbourhood), not a stranger: searching those
                # few queries again with a much wider beam buys the recall of a large expansion_search at the
                # median cost of the small one (measured at 1M in docs/performance.md).
                weak = np.flatnonzero(sims_out[:, 0] < retry_below)
                if len(weak):
                    normal = self._index.expansion_search
                    self._index.expansion_search = max(normal, self.retry_expansion)
                    try:
                        found = self._index.search(q[weak], k, threads=self.threads)
                    finally:
                        self._index.expansion_search = normal
                    self._fill(found, sims_out, keys_out, rows=weak)
        return sims_out, keys_out

    @staticmethod
    def _fill(
        found: Matches | BatchMatches,
        sims_out: np.ndarray,
        keys_out: np.ndarray,
        rows: np.ndarray | None = None,
    ) -> None:
        """Copy usearch matches into the padded outputs (at `rows`, or the first rows in order)."""
        if isinstance(found, Matches):  # usearch unwraps a batch of one query
            counts = np.array([len(found.keys)])
            keys_2d, dist_2d = found.keys[None, :], found.distances[None, :]
        else:
            assert isinstance(found, BatchMatches)
            counts, keys_2d, dist_2d = found.counts, found.keys, found.distances
        targets = range(len(counts)) if rows is None else rows.tolist()
        for i, (row, count) in enumerate(zip(targets, np.asarray(counts).tolist(), strict=True)):
            keys_out[row, :] = PAD_KEY
            sims_out[row, :] = -np.inf
            keys_out[row, :count] = keys_2d[i, :count].view(np.int64)
            # f16/i8 rounding can put an exact match at 1.0001; similarities are cosines, so clip.
            sims_out[row, :count] = np.clip(1.0 - dist_2d[i, :count], -1.0, 1.0)


class AutoIndex:
    """Exact search while the gallery is small, the HNSW graph once it has grown past `threshold` vectors.

    Both indexes are maintained while small (so crossing the threshold needs no rebuild and no pause); once
    crossed, the exact copy is dropped to save memory and the graph answers from then on, even if deletions
    later bring the size back under the threshold (no flapping, no rebuild).
    """

    def __init__(self, dim: int, *, threshold: int = DEFAULT_AUTO_THRESHOLD, **hnsw_options: object) -> None:
        if threshold < 0:
            raise ValueError(f"auto index threshold must be >= 0, got {threshold}")
        self.dim = int(dim)
        self.threshold = int(threshold)
        self._hnsw = HnswIndex(dim, **hnsw_options)  # type: ignore[arg-type]
        self._exact: ExactIndex | None = ExactIndex(dim) if threshold > 0 else None
        self._lock = threading.Lock()

    @property
    def active(self) -> str:
        """Which index answers searches now: "exact" or "hnsw"."""
        return "exact" if self._exact is not None else "hnsw"

    def __len__(self) -> int:
        return len(self._hnsw)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the graph (which always holds every vector); the exact copy is refilled on restore."""
        self._hnsw.save(path)

    def graph_options(self) -> dict[str, object]:
        return {"threshold": self.threshold, **self._hnsw.graph_options()}

    def keys(self) -> np.ndarray:
        return self._hnsw.keys()

    def restored(self, path: str | os.PathLike[str]) -> AutoIndex:
        """The graph saved at `path` with this index's options. At or under `threshold` vectors the restored
        index answers from an exact copy again, which is empty: fill it with `fill_exact` before searching."""
        index = AutoIndex.__new__(AutoIndex)
        index.dim, index.threshold = self.dim, self.threshold
        index._hnsw = self._hnsw.restored(path)
        small = self.threshold > 0 and len(index._hnsw) <= self.threshold
        index._exact = ExactIndex(self.dim) if small else None
        index._lock = threading.Lock()
        return index

    @property
    def needs_exact_fill(self) -> bool:
        """True when exact search answers but its copy lacks the graph's vectors (just restored)."""
        return self._exact is not None and len(self._exact) != len(self._hnsw)

    def fill_exact(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Give the exact copy full-precision vectors (the graph keeps them quantised); graph unchanged."""
        with self._lock:
            if self._exact is not None:
                self._exact.add(keys, vectors)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        with self._lock:
            self._hnsw.add(keys, vectors)
            if self._exact is not None:
                if len(self._hnsw) > self.threshold:
                    self._exact = None
                else:
                    self._exact.add(keys, vectors)

    def remove(self, keys: np.ndarray) -> None:
        with self._lock:
            self._hnsw.remove(keys)
            if self._exact is not None:
                self._exact.remove(keys)

    def search(
        self, queries: np.ndarray, k: int, *, retry_below: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        exact = self._exact  # read once: add() may drop it concurrently
        return (exact if exact is not None else self._hnsw).search(queries, k, retry_below=retry_below)


def make_index(kind: IndexKind | str, dim: int, **options: object) -> VectorIndex:
    """Build the gallery index named by configuration.

    kind: "exact" (numpy, perfect recall; default for small galleries), "hnsw" (usearch graph; options
    connectivity, expansion_add, expansion_search, dtype, threads, retry_below, retry_expansion) or "auto"
    (exact up to `threshold` vectors, then HNSW; takes the HNSW options too). retry_below is only the
    default known/unknown line of searches that pass none: the service's gallery passes the threshold of
    each identify call (the served bundle's, or the request's), so a probe whose best match is weak is
    searched again with retry_expansion against the line that decides it.
    For the gallery's `index_factory`, bind the kind and options:
    `functools.partial(make_index, "auto", threshold=50_000)`.
    """
    if kind == "exact":
        if options:
            raise ValueError(f"index kind 'exact' takes no options, got {', '.join(sorted(options))}")
        return ExactIndex(dim)
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    allowed = set(_HNSW_OPTIONS) | ({"threshold"} if kind == "auto" else set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for index kind {kind!r}; "
            f"valid: {', '.join(sorted(allowed))}"
        )
    if kind == "hnsw":
        return HnswIndex(dim, **options)  # type: ignore[arg-type]
    return AutoIndex(dim, **options)  # type: ignore[arg-type]
