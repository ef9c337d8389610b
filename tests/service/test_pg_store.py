"""PostgreSQL + pgvector identity store against a real server: protocol semantics, durability, change feed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("psycopg", reason="PostgreSQL tests need the pg extra: pip install '.[pg]'")
pytest.importorskip("pgvector", reason="PostgreSQL tests need the pg extra: pip install '.[pg]'")


from service.gallery.ann import HnswIndex
from service.gallery.follower import ChangeFollower
from service.gallery.store import ChangeBatch, IdentityExistsError, IdentityStore, StoreError, open_store
from service.gallery.store.postgres import PostgresIdentityStore

DIM = 8


@pytest.fixture
def store(pg_database: str) -> Iterator[PostgresIdentityStore]:
    s = PostgresIdentityStore(pg_database, DIM)
    yield s
    s.close()


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_store_satisfies_identity_store_protocol(store: PostgresIdentityStore) -> None:
    assert isinstance(store, IdentityStore)


def test_open_store_selects_postgres_by_url_scheme(pg_database: str) -> None:
    s = open_store(pg_database, DIM)
    try:
        assert isinstance(s, PostgresIdentityStore)
    finally:
        s.close()


def test_add_get_list_count_round_trip(store: PostgresIdentityStore) -> None:
    a, replaced = store.add("alice", unit(1), image_count=2, model_id="m1", metadata={"team": "red"})
    b, _ = store.add("bob", unit(2), image_count=1, model_id="m1")
    assert not replaced and a.key != b.key
    got = store.get("alice")
    assert got is not None and got.key == a.key and got.image_count == 2 and got.metadata == {"team": "red"}
    assert got.embedding.dtype == np.float32
    np.testing.assert_array_equal(got.embedding, unit(1))
    assert store.get("nobody") is None
    assert [r.name for r in store.list()] == ["alice", "bob"]
    assert [r.name for r in store.list(offset=1, limit=5)] == ["bob"]
    assert store.count() == 2
    assert set(store.get_by_keys([a.key, b.key, 999_999])) == {a.key, b.key}
    assert store.get_by_keys([]) == {}


def test_duplicate_name_is_refused_unless_replacing_and_replace_keeps_key(
    store: PostgresIdentityStore,
) -> None:
    first, _ = store.add("carol", unit(3), image_count=1, model_id="m1")
    with pytest.raises(IdentityExistsError, match="carol"):
        store.add("carol", unit(4), image_count=1, model_id="m1")
    second, replaced = store.add("carol", unit(4), image_count=3, model_id="m2", replace=True)
    assert replaced and second.key == first.key and second.image_count == 3
    stored = store.get("carol")
    assert stored is not None and stored.model_id == "m2"
    np.testing.assert_array_equal(stored.embedding, unit(4))
    assert store.count() == 1


def test_delete_returns_the_record_and_unknown_names_return_none(store: PostgresIdentityStore) -> None:
    rec, _ = store.add("dave", unit(5), image_count=1, model_id="m1")
    removed = store.delete("dave")
    assert removed is not None and removed.key == rec.key
    assert store.delete("dave") is None and store.count() == 0


def test_iter_all_pages_through_every_identity(store: PostgresIdentityStore) -> None:
    for i in range(25):
        store.add(f"p{i}", unit(100 + i), image_count=1, model_id="m1")
    batches = list(store.iter_all(batch_size=10))
    assert [len(b) for b in batches] == [10, 10, 5]
    assert [r.name for b in batches for r in b] == [f"p{i}" for i in range(25)]


def test_identities_survive_closing_and_reopening(pg_database: str) -> None:
    s = PostgresIdentityStore(pg_database, DIM)
    s.add("erin", unit(6), image_count=1, model_id="m1")
    s.close()
    reopened = PostgresIdentityStore(pg_database, DIM)
    try:
        assert reopened.get("erin") is not None
    finally:
        reopened.close()


def test_reopening_with_another_dimension_names_both(pg_database: str) -> None:
    PostgresIdentityStore(pg_database, DIM).close()
    with pytest.raises(StoreError, match="holds 8-d embeddings but the model produces 16-d"):
        PostgresIdentityStore(pg_database, 16)


def test_wrong_embedding_size_and_nan_are_refused(store: PostgresIdentityStore) -> None:
    with pytest.raises(ValueError, match="8-d"):
        store.add("x", np.ones(3, dtype=np.float32), image_count=1, model_id="m1")
    bad = unit(7)
    bad[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        store.add("x", bad, image_count=1, model_id="m1")


def test_unreachable_server_error_hides_the_password() -> None:
    with pytest.raises(StoreError, match="cannot open PostgreSQL identity store") as info:
        PostgresIdentityStore("postgresql://user:s3cret@127.0.0.1:1/db", DIM, connect_timeout_s=2)
    assert "s3cret" not in str(info.value)


def test_change_feed_reports_net_upserts_and_deletes_after_a_cursor(store: PostgresIdentityStore) -> None:
    a, _ = store.add("f1", unit(8), image_count=1, model_id="m1")
    cursor = store.change_cursor()
    b, _ = store.add("f2", unit(9), image_count=1, model_id="m1")
    store.add("f1", unit(10), image_count=1, model_id="m1", replace=True)
    c, _ = store.add("f3", unit(11), image_count=1, model_id="m1")
    store.delete("f3")
    batch = store.changes_since(cursor)
    assert batch.cursor == store.change_cursor() > cursor
    assert sorted(r.name for r in batch.upserts) == ["f1", "f2"]
    np.testing.assert_array_equal(next(r for r in batch.upserts if r.key == a.key).embedding, unit(10))
    assert batch.deleted == [c.key]
    assert b.key in {r.key for r in batch.upserts}
    assert store.changes_since(batch.cursor) == ChangeBatch(batch.cursor, [], [])


def test_pruned_feed_tells_a_lagging_replica_to_rebuild(store: PostgresIdentityStore) -> None:
    for i in range(5):
        store.add(f"g{i}", unit(20 + i), image_count=1, model_id="m1")
    assert store.prune_changes(keep_last=2) == 3
    latest = store.change_cursor()
    assert len(store.changes_since(latest - 2).upserts) == 2
    with pytest.raises(StoreError, match="rebuilt from the store"):
        store.changes_since(0)


def test_follower_keeps_another_replicas_index_in_sync(pg_database: str) -> None:
    writer = PostgresIdentityStore(pg_database, DIM)
    reader = PostgresIdentityStore(pg_database, DIM)
    index = HnswIndex(DIM, dtype="f32")
    applied = threading.Event()

    def apply(batch: ChangeBatch) -> None:
        if batch.upserts:
            keys = np.array([r.key for r in batch.upserts])
            index.add(keys, np.stack([r.embedding for r in batch.upserts]))
        if batch.deleted:
            index.remove(np.array(batch.deleted))
        applied.set()

    # A long poll interval: the follower must be woken by NOTIFY, not by polling.
    follower = ChangeFollower(reader, apply, cursor=reader.change_cursor(), poll_interval_s=30).start()
    try:
        rec, _ = writer.add("hank", unit(30), image_count=1, model_id="m1")
        deadline = time.monotonic() + 10
        while len(index) == 0 and time.monotonic() < deadline:
            applied.wait(0.05)
        _, keys = index.search(unit(30), 1)
        assert keys[0, 0] == rec.key
        writer.delete("hank")
        deadline = time.monotonic() + 10
        while len(index) != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(index) == 0
    finally:
        follower.stop()
        writer.close()
        reader.close()


def test_concurrent_writers_from_two_replicas_lose_no_change(pg_database: str) -> None:
    stores = [PostgresIdentityStore(pg_database, DIM) for _ in range(2)]
    cursor = stores[0].change_cursor()

    def enroll(s: PostgresIdentityStore, prefix: str) -> None:
        for i in range(20):
            s.add(f"{prefix}{i}", unit(1000 + i), image_count=1, model_id="m1")

    threads = [threading.Thread(target=enroll, args=(s, p)) for s, p in zip(stores, "ab", strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen: set[str] = set()
    while True:
        batch = stores[1].changes_since(cursor, limit=7)
        if batch.cursor == cursor:
            break
        seen |= {r.name for r in batch.upserts}
        cursor = batch.cursor
    assert len(seen) == 40
    for s in stores:
        s.close()


def test_gallery_snapshot_catches_up_through_the_change_feed(
    store: PostgresIdentityStore, pg_database: str, tmp_path: Path
) -> None:
    from functools import partial

    from service.gallery.ann import make_index
    from service.gallery.gallery import Gallery
    from service.gallery.snapshot import open_gallery, save_snapshot

    factory = partial(make_index, "hnsw")
    centers = np.eye(1, DIM, dtype=np.float32)
    gallery = Gallery(centers, ["c"], store, index_factory=factory)
    for i in range(10):
        gallery.enroll(f"p{i}", unit(i)[None], model_id="m:1")
    save_snapshot(tmp_path / "snap", gallery, store.change_cursor)
    gallery.enroll("late", unit(50)[None], model_id="m:1")
    gallery.delete("p3")

    start = open_gallery(tmp_path / "snap", centers, ["c"], store, index_factory=factory)

    assert start.source == "snapshot" and start.replayed == 2 and start.cursor == store.change_cursor()
    found = {m.name for m in start.gallery.search(np.stack([unit(50), unit(3)]), 20)[0]}
    assert "late" in found and "p3" not in found and start.gallery.num_enrolled == 10
    other = PostgresIdentityStore(pg_database, DIM)
    assert other.store_id() == store.store_id() and len(store.store_id()) == 32
    other.close()
