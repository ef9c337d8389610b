"""SQLite identity store: uniqueness, replace keeps the key, durability across reopen, dimension guard, change
feed (net changes after a cursor, pruning) and the migration of files written before it."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from service.gallery.store import (
    ChangeFeedStore,
    IdentityExistsError,
    IdentityStore,
    SQLiteIdentityStore,
    StoreError,
    open_store,
)


def unit(seed: int, dim: int = 4) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def store(tmp_path: Path) -> SQLiteIdentityStore:
    s = SQLiteIdentityStore(tmp_path / "ids.db", dim=4)
    yield s
    s.close()


def test_sqlite_store_satisfies_the_identity_store_protocol(store: SQLiteIdentityStore) -> None:
    assert isinstance(store, IdentityStore)


def test_store_uses_wal_journal(store: SQLiteIdentityStore) -> None:
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_add_then_get_returns_the_same_record(store: SQLiteIdentityStore) -> None:
    record, replaced = store.add("alice", unit(0), image_count=3, model_id="m:1", metadata={"team": "blue"})
    got = store.get("alice")
    assert not replaced
    assert got is not None
    assert got.key == record.key
    assert got.image_count == 3 and got.model_id == "m:1" and got.metadata == {"team": "blue"}
    np.testing.assert_array_equal(got.embedding, unit(0))


def test_duplicate_name_conflicts_unless_replace_and_replace_keeps_the_key(
    store: SQLiteIdentityStore,
) -> None:
    first, _ = store.add("alice", unit(0), image_count=1, model_id="m:1")
    with pytest.raises(IdentityExistsError):
        store.add("alice", unit(1), image_count=1, model_id="m:1")
    second, replaced = store.add("alice", unit(1), image_count=2, model_id="m:1", replace=True)
    assert replaced and second.key == first.key and store.count() == 1
    np.testing.assert_array_equal(store.get("alice").embedding, unit(1))


def test_delete_returns_the_removed_record_and_unknown_gives_none(store: SQLiteIdentityStore) -> None:
    record, _ = store.add("bob", unit(2), image_count=1, model_id="m:1")
    assert store.delete("bob").key == record.key
    assert store.delete("bob") is None
    assert store.get("bob") is None


def test_list_pages_in_enrollment_order_and_iter_all_covers_everything(store: SQLiteIdentityStore) -> None:
    for i in range(7):
        store.add(f"id{i}", unit(i), image_count=1, model_id="m:1")
    assert [r.name for r in store.list(offset=2, limit=3)] == ["id2", "id3", "id4"]
    batches = list(store.iter_all(batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [r.name for b in batches for r in b] == [f"id{i}" for i in range(7)]
    keys = [r.key for r in store.list(limit=2)]
    assert set(store.get_by_keys(keys)) == set(keys)


def test_records_survive_reopening_the_file(tmp_path: Path) -> None:
    s = SQLiteIdentityStore(tmp_path / "ids.db", dim=4)
    s.add("carol", unit(3), image_count=2, model_id="m:1")
    s.close()
    again = open_store(f"sqlite:///{tmp_path / 'ids.db'}", dim=4)
    assert again.get("carol").image_count == 2
    again.close()


def test_reopening_with_another_dimension_is_refused_naming_the_setting(tmp_path: Path) -> None:
    SQLiteIdentityStore(tmp_path / "ids.db", dim=4).close()
    with pytest.raises(StoreError, match="IDEMBED_STORE_URL"):
        SQLiteIdentityStore(tmp_path / "ids.db", dim=8)


def test_embedding_of_wrong_size_or_nan_is_rejected(store: SQLiteIdentityStore) -> None:
    with pytest.raises(ValueError, match="4-d"):
        store.add("x", np.ones(5), image_count=1, model_id="m:1")
    with pytest.raises(ValueError, match="NaN"):
        store.add("x", np.array([np.nan, 0, 0, 1]), image_count=1, model_id="m:1")
    assert store.count() == 0


def test_unknown_url_scheme_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="unsupported store URL"):
        open_store("redis://localhost/0", dim=4)


def test_concurrent_enrollments_from_threads_all_land_once(store: SQLiteIdentityStore) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(20):
                store.add(f"t{t}-{i}", unit(i), image_count=1, model_id="m:1")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert store.count() == 80


def test_change_feed_reports_net_upserts_and_deletes_after_a_cursor(store: SQLiteIdentityStore) -> None:
    assert isinstance(store, ChangeFeedStore)
    assert store.change_cursor() == 0
    a, _ = store.add("a", unit(1), image_count=1, model_id="m:1")
    cursor = store.change_cursor()
    b, _ = store.add("b", unit(2), image_count=1, model_id="m:1")
    store.add("a", unit(3), image_count=2, model_id="m:1", replace=True)
    store.delete("b")
    with pytest.raises(IdentityExistsError):
        store.add("a", unit(4), image_count=1, model_id="m:1")  # refused: logs no change

    batch = store.changes_since(cursor)

    assert batch.cursor == store.change_cursor() == cursor + 3
    assert [(r.key, r.image_count) for r in batch.upserts] == [(a.key, 2)] and batch.deleted == [b.key]
    assert store.changes_since(batch.cursor).upserts == [] and store.changes_since(batch.cursor).deleted == []


def test_pruned_feed_refuses_an_older_cursor_but_keeps_the_cursor(store: SQLiteIdentityStore) -> None:
    for i in range(5):
        store.add(f"p{i}", unit(i), image_count=1, model_id="m:1")
    assert store.prune_changes(keep_last=0) == 5
    assert store.change_cursor() == 5  # not 0: a later index must not replay from before the prune
    with pytest.raises(StoreError, match="pruned through 5"):
        store.changes_since(2)
    assert store.changes_since(5).upserts == []


def test_old_file_without_change_feed_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # the schema before the change feed existed
        db.executescript(
            "CREATE TABLE identities (key INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, "
            "embedding BLOB NOT NULL, dim INTEGER NOT NULL, image_count INTEGER NOT NULL, "
            "model_id TEXT NOT NULL, metadata TEXT NOT NULL, created_at TEXT NOT NULL);"
            "CREATE TABLE store_info (k TEXT PRIMARY KEY, v TEXT NOT NULL);"
            "INSERT INTO store_info VALUES ('dim', '4');"
        )
        db.execute(
            "INSERT INTO identities (name, embedding, dim, image_count, model_id, metadata, created_at) "
            "VALUES ('old', ?, 4, 1, 'm:0', '{}', '2024-01-01T00:00:00+00:00')",
            (unit(0).tobytes(),),
        )

    store = SQLiteIdentityStore(path, dim=4)
    try:
        assert [r.name for r in store.list()] == ["old"] and store.change_cursor() == 0
        assert len(store.store_id()) == 32 and store.names_by_key() == {1: "old"}
        new, _ = store.add("new", unit(1), image_count=1, model_id="m:1")
        assert store.changes_since(0).upserts[0].key == new.key and store.change_cursor() == 1
    finally:
        store.close()
    assert SQLiteIdentityStore(path, dim=4).store_id() == store.store_id()  # stable across opens


def test_iter_all_includes_a_row_keyed_zero(store: SQLiteIdentityStore) -> None:
    # Keys the store assigns start at 1, but a row written with key 0 must not vanish from the index.
    with sqlite3.connect(store.path) as db:
        db.execute(
            "INSERT INTO identities (key, name, embedding, dim, image_count, model_id, metadata, created_at) "
            "VALUES (0, 'zero', ?, 4, 1, 'm:0', '{}', '2024-01-01T00:00:00+00:00')",
            (unit(0).tobytes(),),
        )
    store.add("one", unit(1), image_count=1, model_id="m:1")
    assert [r.name for batch in store.iter_all(batch_size=1) for r in batch] == ["zero", "one"]


def test_images_are_kept_with_their_identity_and_re_embedding_is_per_model(
    store: SQLiteIdentityStore,
) -> None:
    a, _ = store.add("a", unit(1), image_count=2, model_id="m:1", images=[b"a1", b"a2"])
    b, _ = store.add("b", unit(2), image_count=1, model_id="m:1")
    assert store.images_of([a.key, b.key]) == {a.key: [b"a1", b"a2"]}
    assert store.count_with_images_by_model() == {"m:1": 1} and store.count_by_model() == {"m:1": 2}
    cursor = store.change_cursor()
    assert store.reembed("m:1", "m:2", {a.key: unit(3), 12345: unit(3)}) == [a.key]
    got = store.get("a")
    assert got is not None and got.model_id == "m:2" and np.allclose(got.embedding, unit(3))
    assert [r.key for r in store.changes_since(cursor).upserts] == [a.key]
    assert store.reembed("m:1", "m:2", {a.key: unit(4)}) == []  # no longer m:1's: left alone
    assert store.names_by_key("m:1") == {b.key: "b"}
    store.add("a", unit(1), image_count=1, model_id="m:2", replace=True)  # its old images go with it
    assert store.images_of([a.key]) == {}
    c, _ = store.add("c", unit(1), image_count=1, model_id="m:2", images=[b"c"])
    store.delete("c")
    assert store.images_of([c.key]) == {}
