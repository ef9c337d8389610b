"""Gallery: centers and enrolled identities searched together, each match tagged with its source."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from service.gallery.gallery import Gallery, ModelChangedError, mean_embedding
from service.gallery.index import ExactIndex
from service.gallery.store import SQLiteIdentityStore


def basis(i: int, dim: int = 4) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[i] = 1.0
    return v


@pytest.fixture
def gallery(tmp_path: Path) -> Gallery:
    store = SQLiteIdentityStore(tmp_path / "g.db", dim=4)
    return Gallery(np.stack([basis(0), basis(1)]), ["zero", "one"], store)


def test_search_ranks_centers_and_enrolled_together_with_sources(gallery: Gallery) -> None:
    gallery.enroll("two", basis(2)[None], model_id="m:1")
    query = np.array([[0.1, 0.0, 1.0, 0.0]], np.float32)
    matches = gallery.search(query, 3)[0]
    assert [(m.name, m.source) for m in matches[:2]] == [("two", "enrolled"), ("zero", "center")]
    assert matches[0].similarity == pytest.approx(1 / np.sqrt(1.01), abs=1e-6)
    assert all(a.similarity >= b.similarity for a, b in itertools.pairwise(matches))


def test_enrolled_template_is_the_normalised_mean_of_normalised_embeddings() -> None:
    template = mean_embedding(np.array([[2.0, 0, 0, 0], [0, 5.0, 0, 0]], np.float32))
    np.testing.assert_allclose(template, [np.sqrt(0.5), np.sqrt(0.5), 0, 0], atol=1e-6)


def test_deleted_identity_is_no_longer_found(gallery: Gallery) -> None:
    gallery.enroll("three", basis(3)[None], model_id="m:1")
    assert gallery.delete("three") is not None
    names = [m.name for m in gallery.search(basis(3)[None], 5)[0]]
    assert "three" not in names and gallery.num_enrolled == 0


def test_replacing_an_identity_moves_its_vector(gallery: Gallery) -> None:
    gallery.enroll("x", basis(2)[None], model_id="m:1")
    gallery.enroll("x", basis(3)[None], model_id="m:1", replace=True)
    best = gallery.search(basis(3)[None], 1)[0][0]
    assert (best.name, best.source) == ("x", "enrolled") and best.similarity == pytest.approx(1.0)
    assert gallery.num_enrolled == 1


def test_gallery_rebuilt_from_the_store_finds_earlier_enrollments(tmp_path: Path) -> None:
    store = SQLiteIdentityStore(tmp_path / "g.db", dim=4)
    Gallery(np.stack([basis(0)]), ["zero"], store).enroll("two", basis(2)[None], model_id="m:1")
    rebuilt = Gallery(np.stack([basis(0)]), ["zero"], store)
    assert rebuilt.search(basis(2)[None], 1)[0][0].name == "two"


def test_new_centers_replace_old_ones_and_keep_enrolled(gallery: Gallery) -> None:
    gallery.enroll("two", basis(2)[None], model_id="m:1")
    gallery.set_centers(np.stack([basis(3)]), ["three"])
    names = {m.name for m in gallery.search(basis(3)[None], 5)[0]}
    assert names == {"three", "two"} and gallery.num_centers == 1


def test_identify_searches_the_chosen_sources_and_decides_at_the_threshold(gallery: Gallery) -> None:
    gallery.enroll("two", basis(2)[None], model_id="m:1")
    query = np.array([[0.6, 0.0, 0.8, 0.0]], np.float32)
    enrolled, centers, both = (
        gallery.identify(query, 3, threshold=0.7, sources=s)[0] for s in ("enrolled", "centers", "both")
    )
    assert [(m.name, m.source) for m in enrolled.matches] == [("two", "enrolled")]
    assert [m.name for m in centers.matches] == ["zero", "one"] and centers.identity is None
    assert [m.name for m in both.matches] == ["two", "zero", "one"]
    assert enrolled.identity == both.identity == "two" and enrolled.known
    strict = gallery.identify(query, 3, threshold=0.9, sources="both")[0]
    assert strict.identity is None and not strict.known and strict.best is not None
    with pytest.raises(ValueError, match="sources"):
        gallery.identify(query, 3, threshold=0.5, sources="all")  # type: ignore[arg-type]


def test_a_gallery_bound_to_a_model_indexes_only_its_identities(tmp_path: Path) -> None:
    store = SQLiteIdentityStore(tmp_path / "m.db", dim=4)
    store.add("old", basis(2), image_count=1, model_id="m:1")
    gallery = Gallery(np.stack([basis(0)]), ["zero"], store, model_id="m:2")
    assert gallery.num_enrolled == 0
    gallery.enroll("new", basis(3)[None], model_id="m:2")
    assert [m.name for m in gallery.search(np.eye(4, dtype=np.float32), 4, sources="enrolled")[3]] == ["new"]
    with pytest.raises(ModelChangedError):
        gallery.enroll("late", basis(1)[None], model_id="m:1")  # embedded by the model served before
    assert store.get("late") is None
    with pytest.raises(ModelChangedError):
        gallery.identify(basis(3)[None], 1, threshold=0.5, sources="enrolled", model_id="m:1")
    # A follower applying another replica's writes: other models' identities are not indexed, and one
    # re-enrolled by another model leaves the index.
    other, _ = store.add("elsewhere", basis(1), image_count=1, model_id="m:1")
    gallery.apply_changes([other], [])
    assert gallery.num_enrolled == 1
    moved, _ = store.add("new", basis(3), image_count=1, model_id="m:1", replace=True)
    gallery.apply_changes([moved], [])
    assert gallery.num_enrolled == 0


def test_switching_models_swaps_centers_and_identities_together(tmp_path: Path) -> None:
    store = SQLiteIdentityStore(tmp_path / "s.db", dim=4)
    gallery = Gallery(np.stack([basis(0)]), ["zero"], store, model_id="m:1")
    gallery.enroll("one", basis(1)[None], model_id="m:1")
    store.add("two", basis(2), image_count=1, model_id="m:2")  # m:2's own, from an earlier time it served
    assert gallery.prepare_model("m:2", np.stack([basis(3)]), ["three"], ExactIndex(4)) == 1
    gallery.enroll("more", basis(1)[None], model_id="m:1")  # written while prepared: mirrored, filtered
    assert gallery.model_id == "m:1" and {
        m.name for m in gallery.search(np.eye(4), 4, sources="enrolled")[1]
    } == {
        "one",
        "more",
    }
    gallery.commit_model()
    assert gallery.model_id == "m:2" and gallery.num_centers == 1
    assert {m.name for row in gallery.search(np.eye(4, dtype=np.float32), 4) for m in row} == {"three", "two"}
