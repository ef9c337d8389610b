"""The recognition decisions (threshold, identify, verify) and the enrolled index all changes go through."""

from __future__ import annotations

import numpy as np

from service.gallery.enrolled import EnrolledIndex
from service.gallery.index import ExactIndex
from service.gallery.recognition import Identification, Match, decision_threshold, verify
from service.gallery.store import EnrolledIdentity


def test_the_requests_threshold_wins_even_when_zero_else_the_calibrated_one() -> None:
    assert decision_threshold(None, 0.8) == 0.8
    assert decision_threshold(0.0, 0.8) == 0.0  # falsy, still the request's
    assert decision_threshold(0.95, 0.8) == 0.95


def test_verify_normalises_clips_and_accepts_at_the_threshold() -> None:
    a = np.array([3.0, 4.0], dtype=np.float32)
    assert verify(a, 10 * a, 1.0).similarity == 1.0 and verify(a, 10 * a, 1.0).same  # clipped, >= decides
    orthogonal = verify(a, np.array([-4.0, 3.0], dtype=np.float32), 0.0)
    assert abs(orthogonal.similarity) < 1e-6 and orthogonal.threshold == 0.0
    opposite = verify(a, -a, -0.5)
    assert opposite.similarity == -1.0 and not opposite.same


def test_identification_is_known_iff_the_best_match_reaches_the_threshold() -> None:
    matches = [Match("ann", 0.7, "enrolled"), Match("7", 0.6, "center")]
    assert Identification(matches, 0.7).identity == "ann"
    below = Identification(matches, 0.71)
    assert not below.known and below.identity is None and below.best == matches[0]
    assert Identification([], 0.1).best is None and not Identification([], 0.1).known


def _record(key: int, model: str, vec: list[float], name: str | None = None) -> EnrolledIdentity:
    v = np.asarray(vec, dtype=np.float32)
    return EnrolledIdentity(key, name or f"id{key}", v / np.linalg.norm(v), 1, model)


def test_enrolled_index_applies_a_batch_for_its_model_only() -> None:
    enrolled = EnrolledIndex(ExactIndex(2), model_id="m1")
    assert enrolled.apply([_record(1, "m1", [1, 0]), _record(2, "m2", [0, 1]), _record(3, "m1", [1, 1])]) == 2
    assert enrolled.names == {1: "id1", 3: "id3"} and len(enrolled) == 2
    # Re-enrolled by another model, and deleted: both leave; applying twice changes nothing.
    for _ in range(2):
        enrolled.apply([_record(1, "m2", [1, 0])], deleted=[3])
        assert enrolled.names == {} and len(enrolled) == 0


def test_enrolled_index_drops_a_key_another_model_took_even_without_its_name() -> None:
    # A snapshot's index holds the key while the store's names no longer do (re-enrolled by another model
    # since): replaying the change must still remove the vector, or the snapshot fails its key check.
    index = ExactIndex(2)
    index.add(np.array([5]), np.array([[1.0, 0.0]], dtype=np.float32))
    enrolled = EnrolledIndex(index, {}, model_id="m1")
    enrolled.apply([_record(5, "m2", [0, 1])])
    assert len(index) == 0
