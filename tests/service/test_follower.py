"""Processes sharing one store follow each other's writes; one whose change feed was pruned past its cursor
fails readiness with the reason, rebuilds its index from the store and becomes ready again (SQLite, and
PostgreSQL when a local server can be started)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.core.config import Settings
from service.gallery.service import GalleryService
from testkit.service_helpers import API_KEY, TinyBundle

pytestmark = pytest.mark.asyncio
AUTH = {"X-API-Key": API_KEY}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    import psycopg

    server = request.getfixturevalue("pg_url")
    name = f"idembed_follow_{abs(hash(request.node.name)) % 10**8}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + "/" + name


async def _clients(stack: AsyncExitStack, *apps: object) -> AsyncIterator[httpx.AsyncClient]:
    for app in apps:
        await stack.enter_async_context(app.router.lifespan_context(app))  # type: ignore[attr-defined]
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        yield await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url="http://t"))


async def _eventually(check: Callable[[], object], timeout_s: float = 15.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await check():  # type: ignore[misc]
            return True
        await asyncio.sleep(0.05)
    return False


async def _identity(client: httpx.AsyncClient, embedding: list[float]) -> str | None:
    r = await client.post("/v1/identify", json={"embeddings": [embedding], "top_k": 1}, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["identity"]


async def test_a_process_behind_the_pruned_feed_fails_readiness_rebuilds_and_is_ready_again(
    make_settings: Callable[..., Settings],
    store_url: str,
    tiny: TinyBundle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Followers poll only when woken here (30 s interval), so the test decides when the reader looks.
    monkeypatch.setattr(GalleryService, "follow_poll_s", 30.0)
    writer_app = create_app(make_settings(store_url=store_url))
    reader_app = create_app(make_settings(store_url=store_url))
    # Hold the reader's rebuild until its readiness has been seen failing.
    release = threading.Event()
    original = GalleryService._rebuild

    def gated(self: GalleryService) -> int:
        if self is reader_app.state.runtime.galleries:
            assert release.wait(30), "the test never released the rebuild"
        return original(self)

    monkeypatch.setattr(GalleryService, "_rebuild", gated)
    alice = tiny.reference([3])[0].tolist()
    bob = tiny.reference([8])[0].tolist()
    async with AsyncExitStack() as stack:
        writer, reader = [c async for c in _clients(stack, writer_app, reader_app)]
        follower = reader_app.state.runtime.galleries.follower
        assert follower is not None
        # The reader looks at the feed only once the writer has pruned it (PostgreSQL's NOTIFY would
        # otherwise wake it to catch up at each enrollment).
        feed_open = threading.Event()
        reader_store = reader_app.state.runtime.galleries.gallery.store
        changes_since = reader_store.changes_since

        def gated_feed(cursor: int, limit: int = 10_000) -> object:
            feed_open.wait(30)
            return changes_since(cursor, limit)

        monkeypatch.setattr(reader_store, "changes_since", gated_feed)
        for name, emb in (("alice", alice), ("bob", bob)):
            r = await writer.post("/v1/identities", json={"name": name, "embeddings": [emb]}, headers=AUTH)
            assert r.status_code == 201, r.text
        store = writer_app.state.runtime.galleries.gallery.store
        assert await asyncio.to_thread(store.prune_changes, 0) == 2  # past the reader's cursor (0)
        feed_open.set()
        follower.wake()

        async def unready() -> bool:
            return (await reader.get("/readyz")).status_code == 503

        assert await _eventually(unready), "the reader stayed ready with an index it cannot bring up to date"
        body = (await reader.get("/readyz")).json()["error"]
        assert body["code"] == "not_ready"
        assert "rebuilt from the store" in body["message"] and "pruned through 2" in body["message"]
        assert (await reader.get("/v2/health/ready")).status_code == 503
        assert (await writer.get("/readyz")).status_code == 200  # the writer's index is whole

        release.set()

        async def ready() -> bool:
            return (await reader.get("/readyz")).status_code == 200

        assert await _eventually(ready), "the reader never became ready again"
        assert follower.rebuilds == 1 and follower.problem is None
        assert await _identity(reader, alice) == "alice" and await _identity(reader, bob) == "bob"

        # And it follows the feed again from the cursor of the rebuild.
        assert (await writer.delete("/v1/identities/alice", headers=AUTH)).status_code == 204
        follower.wake()

        async def forgot() -> bool:
            return await _identity(reader, alice) != "alice"

        assert await _eventually(forgot), "after the rebuild the reader no longer follows the writer"
