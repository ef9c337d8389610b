"""The enrolled identities of one model as searched: a vector index of their templates and key -> name.

Every change reaches it through `apply` (an enrollment, a deletion, a change batch of the store's feed, a
snapshot's replay), so "index this model's records, drop the keys another model re-enrolled or that were
deleted" is written once. Not locked itself: the gallery serialises writers, and searches read a consistent
index (each `VectorIndex` locks its own calls) and a name map that only ever gains or loses whole entries.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from service.gallery.index import VectorIndex
from service.gallery.store import EnrolledIdentity, IdentityStore


class EnrolledIndex:
    """`index` holds the templates of the identities `model_id` enrolled (None: of every model), `names` their
    names by key; the two always hold the same keys."""

    def __init__(
        self, index: VectorIndex, names: dict[int, str] | None = None, *, model_id: str | None = None
    ) -> None:
        self.index = index
        self.names: dict[int, str] = {} if names is None else names
        self.model_id = model_id

    def __len__(self) -> int:
        return len(self.index)

    def accepts(self, record: EnrolledIdentity) -> bool:
        return self.model_id is None or record.model_id == self.model_id

    def apply(self, upserts: list[EnrolledIdentity], deleted: Iterable[int] = ()) -> int:
        """Index the records this model made; drop records of the same key another model made (an identity
        re-enrolled by it) and the `deleted` keys. Idempotent; returns how many records were indexed."""
        mine = [r for r in upserts if self.accepts(r)]
        gone = [r.key for r in upserts if not self.accepts(r)]
        gone.extend(int(k) for k in deleted)
        if gone:
            self.drop(gone)
        if mine:
            self.add_templates(mine, [r.embedding for r in mine])
        return len(mine)

    def add_templates(self, records: list[EnrolledIdentity], templates: list[np.ndarray]) -> None:
        """Index `templates` under the records' keys and names (re-embedded ones differ from the stored)."""
        if not records:
            return
        self.index.add(np.array([r.key for r in records], dtype=np.int64), np.stack(templates))
        for r in records:
            self.names[r.key] = r.name

    def drop(self, keys: list[int]) -> None:
        self.index.remove(np.asarray(keys, dtype=np.int64))
        for key in keys:
            self.names.pop(int(key), None)

    def load(self, store: IdentityStore, batch_size: int = 10_000) -> int:
        """Index every stored identity this model enrolled; returns how many."""
        return sum(self.apply(batch) for batch in store.iter_all(batch_size))
