"""The recognition decisions, in one place: which threshold applies, whether a query is a known identity
(identify), and whether two faces are the same identity (verify). Routes only parse and format.

One line decides everything: the request's threshold, else the calibrated one of the bundle that made the
embeddings (the similarity at the bundle's target false-accept rate). For identify it is also the line below
which an approximate (HNSW) search retries a query with a wide beam (`VectorIndex.search(retry_below=)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from bundle.files import l2_normalize

Source = Literal["center", "enrolled"]
# What identify searches: the bundle's class centers (the training identities), enrolled identities, or both.
Sources = Literal["enrolled", "centers", "both"]
SOURCES: tuple[str, ...] = get_args(Sources)


def decision_threshold(requested: float | None, calibrated: float) -> float:
    """The line known/unknown and same/different are decided against."""
    return calibrated if requested is None else requested


@dataclass(frozen=True)
class Match:
    name: str
    similarity: float
    source: Source


@dataclass(frozen=True)
class Identification:
    """One query's top-k matches and the decision: the best match is the identity iff it reaches threshold."""

    matches: list[Match]
    threshold: float

    @property
    def best(self) -> Match | None:
        return self.matches[0] if self.matches else None

    @property
    def known(self) -> bool:
        best = self.best
        return best is not None and best.similarity >= self.threshold

    @property
    def identity(self) -> str | None:
        best = self.best
        return best.name if best is not None and self.known else None


@dataclass(frozen=True)
class Verification:
    """Two faces' cosine similarity and the decision: the same identity iff it reaches threshold."""

    similarity: float
    threshold: float

    @property
    def same(self) -> bool:
        return self.similarity >= self.threshold


def verify(a: np.ndarray, b: np.ndarray, threshold: float) -> Verification:
    """Compare two embeddings (normalised here; a client's need not be) against `threshold`."""
    a, b = (l2_normalize(v) for v in (a, b))
    return Verification(float(np.clip(np.dot(a, b), -1.0, 1.0)), threshold)
