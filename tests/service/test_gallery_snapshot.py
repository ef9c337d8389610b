"""Gallery snapshots: a saved hnsw/auto index plus the store's changes since equals a rebuild; anything that
does not fit (damaged file, other store, other options, pruned feed) falls back to a rebuild with a warning;
the admin endpoint needs the API key; graceful shutdown writes the snapshot and the next start uses it."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Callable
from contextlib import closing
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.client import IdembedClient
from service.core.config import Settings
from service.gallery.ann import AutoIndex, make_index
from service.gallery.gallery import Gallery, IndexFactory
from service.gallery.service import GalleryService
from service.gallery.snapshot import (
    MANIFEST_NAME,
    GalleryStart,
    SnapshotError,
    open_gallery,
    read_manifest,
    save_snapshot,
)
from service.gallery.store import SQLiteIdentityStore
from testkit.service_helpers import API_KEY, TinyBundle, start_server

DIM = 16
N = 120
CENTERS = np.eye(2, DIM, dtype=np.float32)
LABELS = ["c0", "c1"]
HNSW: IndexFactory = partial(make_index, "hnsw")


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


VECTORS = unit(np.random.default_rng(0), N + 10)
QUERIES = unit(np.random.default_rng(1), 20)


@pytest.fixture
def store(tmp_path: Path) -> SQLiteIdentityStore:
    s = SQLiteIdentityStore(tmp_path / "ids.sqlite3", DIM)
    yield s
    s.close()


def enrolled(store: SQLiteIdentityStore, factory: IndexFactory = HNSW, n: int = N) -> Gallery:
    gallery = Gallery(CENTERS, LABELS, store, index_factory=factory)
    for i in range(n):
        gallery.enroll(f"id-{i}", VECTORS[i][None], model_id="m:1")
    return gallery


def snapshot(tmp_path: Path, gallery: Gallery) -> Path:
    directory = tmp_path / "snap"
    save_snapshot(directory, gallery, gallery.store.change_cursor)  # type: ignore[attr-defined]
    return directory


def open_from(directory: Path, store: SQLiteIdentityStore, factory: IndexFactory = HNSW) -> GalleryStart:
    return open_gallery(directory, CENTERS, LABELS, store, index_factory=factory)


def results(gallery: Gallery) -> list[list[tuple[str, float]]]:
    return [[(m.name, round(m.similarity, 3)) for m in row] for row in gallery.search(QUERIES, 5)]


def rebuilt(store: SQLiteIdentityStore, factory: IndexFactory = HNSW) -> Gallery:
    return Gallery(CENTERS, LABELS, store, index_factory=factory)


def test_gallery_from_snapshot_searches_like_a_rebuild(tmp_path: Path, store: SQLiteIdentityStore) -> None:
    directory = snapshot(tmp_path, enrolled(store))
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    assert manifest["identities"] == N and manifest["cursor"] == N and manifest["index_kind"] == "hnsw"
    assert manifest["store_id"] == store.store_id() and len(manifest["index_sha256"]) == 64

    start = open_from(directory, store)

    assert start.source == "snapshot" and start.replayed == 0 and start.cursor == N
    assert start.gallery.num_enrolled == N
    assert results(start.gallery) == results(rebuilt(store))


def test_changes_after_the_snapshot_are_replayed_at_start(tmp_path: Path, store: SQLiteIdentityStore) -> None:
    gallery = enrolled(store)
    directory = snapshot(tmp_path, gallery)
    gallery.enroll("newcomer", VECTORS[N][None], model_id="m:1")
    gallery.enroll("id-3", VECTORS[N + 1][None], model_id="m:1", replace=True)
    gallery.delete("id-7")

    start = open_from(directory, store)

    assert start.source == "snapshot" and start.replayed == 3 and start.cursor == store.change_cursor()
    probe = start.gallery.search(VECTORS[[N, N + 1, 7]], 1)
    assert [(m[0].name, round(m[0].similarity, 2)) for m in probe[:2]] == [("newcomer", 1.0), ("id-3", 1.0)]
    assert probe[2][0].name != "id-7"
    assert start.gallery.num_enrolled == N
    assert results(start.gallery) == results(rebuilt(store))


def test_auto_index_under_its_threshold_restores_exact_search(
    tmp_path: Path, store: SQLiteIdentityStore
) -> None:
    auto: IndexFactory = partial(make_index, "auto", threshold=1000)
    directory = snapshot(tmp_path, enrolled(store, auto))

    start = open_from(directory, store, auto)

    assert start.source == "snapshot"
    index = start.gallery.enrolled_index
    assert isinstance(index, AutoIndex) and index.active == "exact"
    top = start.gallery.search(VECTORS[:5], 1)
    assert [m[0].similarity for m in top] == pytest.approx([1.0] * 5, abs=1e-6)  # f32, not the f16 graph
    assert results(start.gallery) == results(rebuilt(store, auto))


def _truncate(directory: Path) -> None:
    index = next(directory.glob("index-*.usearch"))
    index.write_bytes(index.read_bytes()[:1000])


def _flip_a_byte(directory: Path) -> None:
    index = next(directory.glob("index-*.usearch"))
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index.write_bytes(bytes(data))


def _edit_manifest(**fields: object) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / MANIFEST_NAME
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    return edit


def _garble_manifest(directory: Path) -> None:
    (directory / MANIFEST_NAME).write_text("{not json")


def _remove_folder(directory: Path) -> None:
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_remove_folder, "no snapshot there yet"),
        (_truncate, "index file is damaged"),
        (_flip_a_byte, "index file is damaged"),
        (_garble_manifest, "not a valid snapshot manifest"),
        (_edit_manifest(dim=8), "embedding dim"),
        (_edit_manifest(store_id="0" * 32), "store id"),
        (_edit_manifest(cursor=10_000), "newer|newest change"),
        (_edit_manifest(format_version=99), "format version"),
    ],
    ids=[
        "missing",
        "truncated",
        "tampered",
        "garbled-manifest",
        "wrong-dim",
        "other-store",
        "future",
        "format",
    ],
)
def test_a_snapshot_that_does_not_fit_is_ignored_with_a_warning_and_the_store_rebuilt(
    tmp_path: Path,
    store: SQLiteIdentityStore,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
    reason: str,
) -> None:
    directory = snapshot(tmp_path, enrolled(store, n=40))
    damage(directory)

    with caplog.at_level(logging.WARNING, logger="idembed.gallery.snapshot"):
        start = open_from(directory, store)

    assert start.source == "store" and start.gallery.num_enrolled == 40
    assert start.refused is not None and str(directory) in start.refused
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "rebuilding the index from the store" in warning and str(directory) in warning
    assert re.search(reason, warning), warning


def test_snapshot_of_another_store_with_the_same_identities_is_refused(
    tmp_path: Path, store: SQLiteIdentityStore, caplog: pytest.LogCaptureFixture
) -> None:
    directory = snapshot(tmp_path, enrolled(store, n=20))
    other = SQLiteIdentityStore(tmp_path / "other.sqlite3", DIM)
    enrolled(other, n=20)
    with caplog.at_level(logging.WARNING):
        start = open_from(directory, other)
    assert start.source == "store" and "store id" in caplog.text


def test_changed_graph_options_rebuild(tmp_path: Path, store: SQLiteIdentityStore) -> None:
    directory = snapshot(tmp_path, enrolled(store, n=20))
    start = open_from(directory, store, partial(make_index, "hnsw", connectivity=8))
    assert start.source == "store" and start.refused is not None and "graph options" in start.refused
    kind_changed = open_from(directory, store, partial(make_index, "auto"))
    assert kind_changed.source == "store" and "index kind" in (kind_changed.refused or "")


def test_search_options_may_change_without_a_rebuild(tmp_path: Path, store: SQLiteIdentityStore) -> None:
    directory = snapshot(tmp_path, enrolled(store, n=20))
    start = open_from(directory, store, partial(make_index, "hnsw", expansion_search=32, retry_below=0.4))
    assert start.source == "snapshot"
    index = start.gallery.enrolled_index
    assert index.expansion_search == 32 and index.retry_below == 0.4


def test_snapshot_older_than_the_pruned_change_feed_is_refused(
    tmp_path: Path, store: SQLiteIdentityStore
) -> None:
    gallery = enrolled(store, n=20)
    directory = snapshot(tmp_path, gallery)
    for i in range(3):
        gallery.enroll(f"late-{i}", VECTORS[N + i][None], model_id="m:1")
    store.prune_changes(keep_last=1)

    start = open_from(directory, store)

    assert start.source == "store" and "pruned" in (start.refused or "")
    assert start.gallery.num_enrolled == 23


def test_exact_index_is_not_snapshotted_and_rebuilds(tmp_path: Path, store: SQLiteIdentityStore) -> None:
    from service.gallery.index import ExactIndex

    gallery = enrolled(store, ExactIndex, n=5)
    with pytest.raises(SnapshotError, match="exact index"):
        save_snapshot(tmp_path / "snap", gallery, store.change_cursor)
    start = open_from(tmp_path / "snap", store, ExactIndex)
    assert start.source == "store" and start.gallery.num_enrolled == 5


def test_a_new_save_replaces_the_old_files(tmp_path: Path, store: SQLiteIdentityStore) -> None:
    gallery = enrolled(store, n=10)
    directory = snapshot(tmp_path, gallery)
    gallery.enroll("one-more", VECTORS[N][None], model_id="m:1")
    directory = snapshot(tmp_path, gallery)
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith("index-")) == [MANIFEST_NAME]
    assert len(list(directory.glob("index-*.usearch"))) == 1
    assert open_from(directory, store).replayed == 0


@pytest.mark.asyncio
async def test_admin_snapshot_needs_the_api_key_and_writes_the_manifest(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    folder = tmp_path / "gallery-snapshot"
    app = create_app(make_settings(gallery_index="hnsw", gallery_snapshot_path=folder))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        assert (await c.post("/v1/admin/snapshot")).status_code == 401
        assert not folder.exists()
        enroll = {"name": "someone", "embeddings": [[1.0] + [0.0] * 15]}
        assert (
            await c.post("/v1/identities", json=enroll, headers={"X-API-Key": API_KEY})
        ).status_code == 201
        r = await c.post("/v1/admin/snapshot", headers={"X-API-Key": API_KEY})
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["identities"] == 1 and body["index_kind"] == "hnsw" and body["path"] == str(folder)
    assert json.loads((folder / MANIFEST_NAME).read_text())["index_sha256"] == body["index_sha256"]


@pytest.mark.asyncio
async def test_a_snapshot_prunes_the_change_feed_to_the_configured_length(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(
        gallery_index="hnsw", gallery_snapshot_path=tmp_path / "snap", change_feed_keep=2
    )
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        for i in range(5):
            body = {"name": f"person-{i}", "embeddings": [[1.0, float(i)] + [0.0] * 14]}
            r = await c.post("/v1/identities", json=body, headers={"X-API-Key": API_KEY})
            assert r.status_code == 201, r.text
        assert (await c.post("/v1/admin/snapshot", headers={"X-API-Key": API_KEY})).status_code == 200
    with closing(sqlite3.connect(tmp_path / "identities.sqlite3")) as db:
        assert db.execute("SELECT count(*) FROM identity_changes").fetchone()[0] == 2
    # The snapshot written on shutdown is still usable: its cursor is the newest change, kept by the prune.
    reopened = SQLiteIdentityStore(tmp_path / "identities.sqlite3", 16)
    try:
        assert open_from(tmp_path / "snap", reopened).replayed == 0
    finally:
        reopened.close()


@pytest.mark.asyncio
async def test_a_snapshot_keeps_the_feed_back_to_its_cursor_while_the_follower_lags(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The follower has not polled since start-up (30 s) when the snapshot is taken, with nothing kept.
    monkeypatch.setattr(GalleryService, "follow_poll_s", 30.0)
    settings = make_settings(
        gallery_index="hnsw", gallery_snapshot_path=tmp_path / "snap", change_feed_keep=0
    )
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        for i in range(3):
            body = {"name": f"person-{i}", "embeddings": [[1.0, float(i)] + [0.0] * 14]}
            r = await c.post("/v1/identities", json=body, headers={"X-API-Key": API_KEY})
            assert r.status_code == 201, r.text
        r = await c.post("/v1/admin/snapshot", headers={"X-API-Key": API_KEY})
        assert r.status_code == 200 and r.json()["cursor"] == 3, r.text
        galleries = app.state.runtime.galleries
        galleries.follower.poll()  # reaches the cursor the prune kept: nothing to rebuild
        assert galleries.problem is None and galleries.follower.rebuilds == 0
        assert (await c.get("/readyz")).status_code == 200
    reopened = SQLiteIdentityStore(tmp_path / "identities.sqlite3", 16)
    try:
        start = open_from(tmp_path / "snap", reopened)
        assert start.source == "snapshot" and start.gallery.num_enrolled == 3
    finally:
        reopened.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("overrides", [{}, {"gallery_snapshot_path": "SNAP"}], ids=["unset", "exact-index"])
async def test_admin_snapshot_without_a_snapshot_to_take_is_409(
    make_settings: Callable[..., Settings], tmp_path: Path, overrides: dict[str, str]
) -> None:
    if overrides:
        overrides = {"gallery_snapshot_path": str(tmp_path / "snap")}
    app = create_app(make_settings(**overrides))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        r = await c.post("/v1/admin/snapshot", headers={"X-API-Key": API_KEY})
    assert r.status_code == 409 and r.json()["error"]["code"] == "snapshot_unavailable"
    expected = "an exact index rebuilds from the store" if overrides else "IDEMBED_GALLERY_SNAPSHOT_PATH"
    assert expected in r.json()["error"]["message"]


@pytest.mark.slow
def test_graceful_shutdown_writes_the_snapshot_and_the_next_start_loads_it(
    server_env: dict[str, str], tmp_path: Path, tiny: TinyBundle
) -> None:
    folder = tmp_path / "snap"
    env = {**server_env, "IDEMBED_GALLERY_INDEX": "hnsw", "IDEMBED_GALLERY_SNAPSHOT_PATH": str(folder)}
    server = start_server(env, tmp_path / "a.log")
    try:
        with IdembedClient(server.url, api_key=API_KEY) as c:
            for i in range(4):
                c.enroll(f"person-{i}", images=[tiny.png(i)])
            written = c.snapshot()  # on demand, through the typed client
            assert written.identities == 4 and written.index_kind == "hnsw"
    finally:
        server.stop()
    assert json.loads((folder / MANIFEST_NAME).read_text())["identities"] == 4

    again = start_server(env, tmp_path / "b.log")
    try:
        with IdembedClient(again.url) as c:
            top = c.identify(images=[tiny.png(2)], top_k=20).results[0].matches
            assert ("person-2", "enrolled") in [(m.identity, m.source) for m in top]
    finally:
        again.stop()
    assert "gallery loaded from snapshot" in again.log()


def test_index_keys_that_disagree_with_the_store_are_refused(
    tmp_path: Path, store: SQLiteIdentityStore
) -> None:
    directory = snapshot(tmp_path, enrolled(store, n=20))
    # A write that bypassed the change feed (a hand edit of the file): the replay cannot see it.
    with sqlite3.connect(store.path) as db:
        db.execute("DELETE FROM identities WHERE name = 'id-4'")

    start = open_from(directory, store)

    assert start.source == "store" and "keys the store does not" in (start.refused or "")
    assert start.gallery.num_enrolled == 19


def test_a_snapshot_of_another_models_identities_is_refused(
    tmp_path: Path, store: SQLiteIdentityStore
) -> None:
    gallery = Gallery(CENTERS, LABELS, store, model_id="m:1", index_factory=HNSW)
    for i in range(5):
        gallery.enroll(f"id-{i}", VECTORS[i][None], model_id="m:1")
    directory = snapshot(tmp_path, gallery)
    assert read_manifest(directory).model_id == "m:1"
    same = open_gallery(directory, CENTERS, LABELS, store, index_factory=HNSW, model_id="m:1")
    assert same.source == "snapshot" and same.gallery.num_enrolled == 5
    other = open_gallery(directory, CENTERS, LABELS, store, index_factory=HNSW, model_id="m:2")
    assert other.source == "store" and other.refused is not None and "model" in other.refused
    assert other.gallery.num_enrolled == 0  # m:2 enrolled none of them
