"""HNSW and auto gallery indexes: recall against exact search, replace/remove semantics, keys, padding."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest

from service.gallery.ann import AutoIndex, HnswIndex, make_index
from service.gallery.index import ExactIndex, VectorIndex

DIM = 32


def unit_rows(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def gallery_vectors() -> np.ndarray:
    return unit_rows(3000, seed=1)


@pytest.fixture(scope="module")
def filled_hnsw(gallery_vectors: np.ndarray) -> HnswIndex:
    index = HnswIndex(DIM, dtype="f32")
    index.add(np.arange(len(gallery_vectors)) * 7 + 3, gallery_vectors)
    return index


def probes_of(vectors: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """Noisy copies of gallery rows: what a second photo of an enrolled person looks like."""
    rng = np.random.default_rng(seed)
    picked = vectors[rng.integers(0, len(vectors), n)]
    q = picked + noise * rng.standard_normal(picked.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def test_hnsw_satisfies_vector_index_protocol() -> None:
    assert isinstance(HnswIndex(DIM), VectorIndex)
    assert isinstance(AutoIndex(DIM), VectorIndex)


def test_hnsw_top1_agrees_with_exact_search(gallery_vectors: np.ndarray, filled_hnsw: HnswIndex) -> None:
    exact = ExactIndex(DIM)
    exact.add(np.arange(len(gallery_vectors)) * 7 + 3, gallery_vectors)
    queries = probes_of(gallery_vectors, 300, noise=0.1, seed=2)
    _, want = exact.search(queries, 1)
    _, got = filled_hnsw.search(queries, 1)
    recall = float(np.mean(got[:, 0] == want[:, 0]))
    assert recall >= 0.99


def test_hnsw_similarities_are_cosines_sorted_descending(
    gallery_vectors: np.ndarray, filled_hnsw: HnswIndex
) -> None:
    queries = probes_of(gallery_vectors, 20, noise=0.2, seed=3)
    sims, keys = filled_hnsw.search(queries, 5)
    assert sims.dtype == np.float32 and keys.dtype == np.int64 and sims.shape == keys.shape == (20, 5)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)
    rows = (keys - 3) // 7
    expected = np.einsum("qd,qkd->qk", queries, gallery_vectors[rows])
    np.testing.assert_allclose(sims, expected, atol=1e-5)


def test_single_query_vector_is_accepted(gallery_vectors: np.ndarray, filled_hnsw: HnswIndex) -> None:
    sims, keys = filled_hnsw.search(gallery_vectors[10], 3)
    assert sims.shape == keys.shape == (1, 3)
    assert keys[0, 0] == 10 * 7 + 3
    assert sims[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_k_larger_than_index_pads_with_minus_one_and_minus_inf() -> None:
    index = HnswIndex(DIM)
    vectors = unit_rows(3, seed=4)
    index.add(np.array([10, 20, 30]), vectors)
    sims, keys = index.search(vectors[:2], 5)
    assert sorted(keys[0, :3].tolist()) == [10, 20, 30]
    assert keys[:, 3:].tolist() == [[-1, -1], [-1, -1]]
    assert np.all(np.isneginf(sims[:, 3:]))
    assert np.all(np.isfinite(sims[:, :3]))


def test_empty_index_returns_only_padding() -> None:
    sims, keys = HnswIndex(DIM).search(unit_rows(2), 3)
    assert np.all(keys == -1) and np.all(np.isneginf(sims))


def test_adding_an_existing_key_replaces_its_vector() -> None:
    index = HnswIndex(DIM, dtype="f32")
    a, b = unit_rows(2, seed=5)
    index.add(np.array([42]), a[None])
    index.add(np.array([42]), b[None])
    assert len(index) == 1
    sims, keys = index.search(b[None], 1)
    assert keys[0, 0] == 42 and sims[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_repeated_key_in_one_batch_keeps_the_last_vector() -> None:
    index = HnswIndex(DIM, dtype="f32")
    a, b = unit_rows(2, seed=6)
    index.add(np.array([7, 7]), np.stack([a, b]))
    assert len(index) == 1
    sims, _ = index.search(b[None], 1)
    assert sims[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_remove_drops_keys_and_ignores_unknown_ones() -> None:
    index = HnswIndex(DIM)
    vectors = unit_rows(50, seed=7)
    index.add(np.arange(50), vectors)
    index.remove(np.array([3, 4, 999]))
    assert len(index) == 48
    _, keys = index.search(vectors, 50)
    assert not np.isin(keys, [3, 4]).any()
    # a removed key can be enrolled again
    index.add(np.array([3]), vectors[3][None])
    _, keys = index.search(vectors[3][None], 1)
    assert keys[0, 0] == 3


def test_large_and_negative_int64_keys_round_trip() -> None:
    index = HnswIndex(DIM)
    vectors = unit_rows(3, seed=8)
    keys_in = np.array([np.iinfo(np.int64).max, -5, 0], dtype=np.int64)
    index.add(keys_in, vectors)
    _, keys = index.search(vectors, 1)
    assert keys[:, 0].tolist() == keys_in.tolist()


@pytest.mark.parametrize("index_cls", [HnswIndex, ExactIndex])
def test_reserved_padding_key_is_rejected(index_cls) -> None:
    # -1 pads short results of every index, so a real key -1 would be indistinguishable from "no match".
    with pytest.raises(ValueError, match="key -1 is reserved"):
        index_cls(DIM).add(np.array([-1]), unit_rows(1))


def test_wrong_vector_shape_names_the_expected_shape() -> None:
    with pytest.raises(ValueError, match=r"\[n, 32\]"):
        HnswIndex(DIM).add(np.array([1]), np.zeros((1, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="2 keys for 1 vectors"):
        HnswIndex(DIM).add(np.array([1, 2]), unit_rows(1))


def test_bad_hnsw_options_are_named() -> None:
    with pytest.raises(ValueError, match="connectivity"):
        HnswIndex(DIM, connectivity=0)
    with pytest.raises(ValueError, match="dtype"):
        HnswIndex(DIM, dtype="f64")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be >= 1"):
        HnswIndex(DIM).search(unit_rows(1), 0)


def test_quantised_storage_keeps_similarity_error_small(gallery_vectors: np.ndarray) -> None:
    """f16 is the default storage: similarities feed thresholds, so their error must stay far below them."""
    index = HnswIndex(DIM)  # default dtype
    index.add(np.arange(len(gallery_vectors)), gallery_vectors)
    queries = probes_of(gallery_vectors, 50, noise=0.2, seed=9)
    sims, keys = index.search(queries, 3)
    exact = np.einsum("qd,qkd->qk", queries, gallery_vectors[keys])
    assert np.max(np.abs(sims - exact)) < 2e-3


def test_auto_index_is_exact_until_threshold_then_hnsw() -> None:
    vectors = unit_rows(40, seed=10)
    index = AutoIndex(DIM, threshold=30)
    index.add(np.arange(30), vectors[:30])
    assert index.active == "exact" and len(index) == 30
    _, keys = index.search(vectors[:5], 1)
    assert keys[:, 0].tolist() == [0, 1, 2, 3, 4]
    index.add(np.arange(30, 40), vectors[30:])
    assert index.active == "hnsw" and len(index) == 40
    _, keys = index.search(vectors[35:], 1)
    assert keys[:, 0].tolist() == [35, 36, 37, 38, 39]
    # shrinking below the threshold keeps the graph (no flapping back to exact)
    index.remove(np.arange(20))
    assert index.active == "hnsw" and len(index) == 20


def test_auto_index_removal_applies_to_the_exact_copy_too() -> None:
    vectors = unit_rows(10, seed=11)
    index = AutoIndex(DIM, threshold=100)
    index.add(np.arange(10), vectors)
    index.remove(np.array([0]))
    _, keys = index.search(vectors[:1], 10)
    assert 0 not in keys[0].tolist() and len(index) == 9


def test_make_index_builds_each_kind_and_binds_as_a_gallery_factory() -> None:
    assert isinstance(make_index("exact", DIM), ExactIndex)
    hnsw = make_index("hnsw", DIM, connectivity=8, expansion_search=64)
    assert isinstance(hnsw, HnswIndex) and hnsw.expansion_search == 64
    factory = functools.partial(make_index, "auto", threshold=5)
    auto = factory(DIM)
    assert isinstance(auto, AutoIndex) and auto.threshold == 5 and auto.dim == DIM


def test_make_index_rejects_unknown_kind_and_options_by_name() -> None:
    with pytest.raises(ValueError, match="unknown index kind 'faiss'"):
        make_index("faiss", DIM)
    with pytest.raises(ValueError, match="efSearch"):
        make_index("hnsw", DIM, efSearch=10)
    with pytest.raises(ValueError, match="threshold"):
        make_index("hnsw", DIM, threshold=10)
    with pytest.raises(ValueError, match="takes no options"):
        make_index("exact", DIM, connectivity=8)


def test_saved_index_reloads_with_same_results(tmp_path, gallery_vectors: np.ndarray) -> None:
    index = HnswIndex(DIM, dtype="f16", expansion_search=100)
    index.add(np.arange(500), gallery_vectors[:500])
    index.save(tmp_path / "g.usearch")
    loaded = HnswIndex.load(tmp_path / "g.usearch", DIM, expansion_search=100)
    assert len(loaded) == 500 and loaded.expansion_search == 100
    queries = probes_of(gallery_vectors[:500], 20, noise=0.1, seed=12)
    np.testing.assert_array_equal(loaded.search(queries, 3)[1], index.search(queries, 3)[1])
    loaded.add(np.array([9999]), gallery_vectors[600][None])  # still incrementally updatable
    assert len(loaded) == 501


def test_loading_an_index_of_another_dimension_or_a_bad_file_names_the_file(tmp_path) -> None:
    index = HnswIndex(DIM)
    index.add(np.arange(3), unit_rows(3))
    index.save(tmp_path / "g.usearch")
    with pytest.raises(ValueError, match=r"g\.usearch: holds a 32-d"):
        HnswIndex.load(tmp_path / "g.usearch", 64)
    (tmp_path / "junk.usearch").write_bytes(b"not an index")
    with pytest.raises(ValueError, match=r"junk\.usearch"):
        HnswIndex.load(tmp_path / "junk.usearch", DIM)


def test_weak_matches_are_searched_again_with_a_wider_beam(gallery_vectors: np.ndarray) -> None:
    """With a beam of 1 the graph misses some exact copies; retry_below recovers every one of them."""
    keys = np.arange(len(gallery_vectors))
    narrow = HnswIndex(DIM, dtype="f32", connectivity=4, expansion_search=1)
    narrow.add(keys, gallery_vectors)
    retrying = HnswIndex(
        DIM, dtype="f32", connectivity=4, expansion_search=1, retry_below=0.99, retry_expansion=512
    )
    retrying.add(keys, gallery_vectors)
    queries = gallery_vectors[:300]
    _, narrow_keys = narrow.search(queries, 1)
    sims, retry_keys = retrying.search(queries, 1)
    assert np.mean(narrow_keys[:, 0] == keys[:300]) < 1.0  # the narrow beam really does miss
    assert np.array_equal(retry_keys[:, 0], keys[:300])
    assert np.all(sims[:, 0] > 0.999)
    assert retrying.expansion_search == 1  # the wide beam was only borrowed


def test_retry_options_are_validated_by_name() -> None:
    with pytest.raises(ValueError, match="retry_below"):
        HnswIndex(DIM, retry_below=1.5)
    with pytest.raises(ValueError, match="retry_expansion"):
        make_index("hnsw", DIM, retry_below=0.5, retry_expansion=0)


def test_onnxruntime_can_be_imported_after_the_ann_index() -> None:
    """usearch 2.26.3-2.26.6 segfault when onnxruntime loads after them (pybind clash); the pin must hold."""
    pytest.importorskip("onnxruntime")
    code = "import service.gallery.ann, onnxruntime; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (
        f"importing onnxruntime after usearch failed (exit {done.returncode}); pin usearch<=2.26.0"
    )


def test_quantised_similarities_never_leave_the_cosine_range() -> None:
    index = HnswIndex(DIM, dtype="i8")
    vectors = unit_rows(200, seed=13)
    index.add(np.arange(200), vectors)
    sims, _ = index.search(vectors, 5)
    assert np.all(sims <= 1.0) and np.all(sims >= -1.0)


def test_each_search_may_bring_its_own_retry_line(gallery_vectors: np.ndarray) -> None:
    """The line passed to `search` (an identify call's threshold) decides the retry, whatever the index was
    built with; without one, the index's own `retry_below` (here: off) applies."""
    keys = np.arange(len(gallery_vectors))
    index = HnswIndex(DIM, dtype="f32", connectivity=4, expansion_search=1, retry_expansion=512)
    index.add(keys, gallery_vectors)
    queries = gallery_vectors[:300]
    _, plain = index.search(queries, 1)
    _, retried = index.search(queries, 1, retry_below=0.99)
    assert np.mean(plain[:, 0] == keys[:300]) < 1.0 and np.array_equal(retried[:, 0], keys[:300])
    _, never = index.search(queries, 1, retry_below=-1.0)  # nothing is below -1: no retry
    assert np.array_equal(never, plain)
    with pytest.raises(ValueError, match="retry_below"):
        index.search(queries, 1, retry_below=1.5)
