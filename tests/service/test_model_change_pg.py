"""The model-change policy on a PostgreSQL store, and across replicas sharing one: the same answers as on
SQLite (test_model_change.py), and a replica never indexes an identity another replica's model enrolled.
Skipped without a local PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
from contextlib import AsyncExitStack

import httpx
import pytest

from testkit import tiny_bundle
from testkit.service_helpers import API_KEY, serving

pytest.importorskip("psycopg", reason="PostgreSQL tests need the pg extra: pip install '.[pg]'")
pytest.importorskip("pgvector", reason="PostgreSQL tests need the pg extra: pip install '.[pg]'")


from service.app import create_app
from service.gallery.store import ServedModel, StoreError
from service.gallery.store.postgres import PostgresIdentityStore

AUTH = {"X-API-Key": API_KEY}
V1, V2 = "tiny-digits:1", "tiny-digits:2"


async def enroll(c: httpx.AsyncClient, name: str, image: bytes) -> None:
    body = {"name": name, "images": [base64.b64encode(image).decode()]}
    r = await c.post("/v1/identities", json=body, headers=AUTH)
    assert r.status_code == 201, r.text


async def names_found(c: httpx.AsyncClient, image: bytes) -> list[str]:
    body = {"images": [base64.b64encode(image).decode()], "top_k": 10}
    r = await c.post("/v1/identify", json=body)
    assert r.status_code == 200, r.text
    return [m["identity"] for m in r.json()["results"][0]["matches"]]


def test_store_counts_identities_by_model_and_remembers_the_served_model(pg_database: str) -> None:
    store = PostgresIdentityStore(pg_database, tiny_bundle.DIM)
    try:
        unit = [1.0] + [0.0] * (tiny_bundle.DIM - 1)
        assert store.count_by_model() == {} and store.model_history().served is None
        store.add("a", unit, image_count=1, model_id=V1)
        b, _ = store.add("b", unit, image_count=1, model_id=V2)
        store.add("c", unit, image_count=1, model_id=V2)
        assert store.count_by_model() == {V1: 1, V2: 2}
        assert set(store.names_by_key(V2).values()) == {"b", "c"} and b.key in store.names_by_key(V2)
        store.record_served_model(ServedModel(V1, "f1"))
        store.record_served_model(ServedModel(V2, "f2"))
        history = store.model_history()
        assert history.served == V2 and history.fingerprints == {V1: "f1", V2: "f2"}
    finally:
        store.close()


def test_store_keeps_images_with_their_identity_and_re_embeds_them(pg_database: str) -> None:
    store = PostgresIdentityStore(pg_database, tiny_bundle.DIM)
    try:
        unit = [1.0] + [0.0] * (tiny_bundle.DIM - 1)
        other = [0.0, 1.0] + [0.0] * (tiny_bundle.DIM - 2)
        a, _ = store.add("a", unit, image_count=2, model_id=V1, images=[b"a1", b"a2"])
        b, _ = store.add("b", unit, image_count=1, model_id=V1)
        assert store.images_of([a.key, b.key]) == {a.key: [b"a1", b"a2"]}
        assert store.count_with_images_by_model() == {V1: 1}
        # Re-embedding touches only identities still of the old model; each update is a change-feed row.
        cursor = store.change_cursor()
        assert store.reembed(V1, V2, {a.key: other, 999_999: other}) == [a.key]
        got = store.get("a")
        assert got is not None and got.model_id == V2 and got.embedding[1] == 1.0
        assert [r.key for r in store.changes_since(cursor).upserts] == [a.key]
        assert store.reembed(V1, V2, {a.key: unit}) == []  # no longer V1's: left alone
        # A replacement drops the images of the template it replaces; deleting drops the rest.
        store.add("a", unit, image_count=1, model_id=V2, replace=True)
        assert store.images_of([a.key]) == {}
        store.add("c", unit, image_count=1, model_id=V2, images=[b"c1"])
        c = store.get("c")
        assert c is not None and store.delete("c") is not None and store.images_of([c.key]) == {}
    finally:
        store.close()


@pytest.mark.asyncio
async def test_reload_and_restart_policy_on_postgres(make_settings, pg_database, models, tiny) -> None:
    eight = tiny.png(tiny.of_digit(8, 1)[0])
    async with serving(make_settings(bundle_path=models / "v1", store_url=pg_database)) as c:
        await enroll(c, "alice", eight)
        r = await c.post("/v1/admin/reload", json={"bundle": "v2"}, headers=AUTH)
        assert r.status_code == 409 and r.json()["error"]["detail"]["orphaned"] == 1, r.text
        r = await c.post("/v1/admin/reload", json={"bundle": "v2", "force": True}, headers=AUTH)
        assert r.status_code == 200 and r.json()["orphaned"] == 1
        assert await names_found(c, eight) == []
        assert (await c.get("/v1/identities/alice")).json()["stale"] is True
    # v2 was served last and enrolled nothing: v1 may start, and matches alice again.
    async with serving(make_settings(bundle_path=models / "v1", store_url=pg_database)) as c:
        assert await names_found(c, eight) == ["alice"]
    # Now v1 is the last served model, with one identity: starting v2 is refused by default.
    app = create_app(make_settings(bundle_path=models / "v2", store_url=pg_database))
    with pytest.raises(StoreError, match="IDEMBED_ON_MODEL_CHANGE"):
        async with app.router.lifespan_context(app):
            pass


@pytest.mark.slow
@pytest.mark.asyncio
async def test_replicas_serving_two_models_never_index_each_others_identities(
    make_settings, pg_database, models, tiny
) -> None:
    """A rolling upgrade: replica A still serves v1 while replica B already serves v2 (started with
    IDEMBED_ON_MODEL_CHANGE=orphan). Each follows the other's writes, and indexes only its own model's."""
    eight = tiny.png(tiny.of_digit(8, 1)[0])
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            serving(make_settings(bundle_path=models / "v1", store_url=pg_database))
        )
        await enroll(a, "old", eight)
        b_settings = make_settings(bundle_path=models / "v2", store_url=pg_database, on_model_change="orphan")
        b = await stack.enter_async_context(serving(b_settings))
        await enroll(b, "new", eight)
        await enroll(a, "old-2", eight)
        # Give the followers time to apply every change (NOTIFY wakes them within milliseconds).
        for _ in range(100):
            if (await a.get("/v1/model")).json()["gallery"]["orphaned"] == 1:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert sorted(await names_found(a, eight)) == ["old", "old-2"]
        assert await names_found(b, eight) == ["new"]
        # Re-enrolled by B's model, "old" leaves A's index too.
        r = await b.post(
            "/v1/identities",
            json={"name": "old", "images": [base64.b64encode(eight).decode()], "replace": True},
            headers=AUTH,
        )
        assert r.status_code == 201
        for _ in range(100):
            if await names_found(a, eight) == ["old-2"]:
                break
            await asyncio.sleep(0.05)
        assert await names_found(a, eight) == ["old-2"]
        assert sorted(await names_found(b, eight)) == ["new", "old"]


@pytest.mark.asyncio
async def test_reload_re_embeds_kept_images_on_postgres(make_settings, pg_database, models, tiny) -> None:
    images = [tiny.png(i) for i in tiny.of_digit(9, 3)]
    settings = make_settings(bundle_path=models / "v1", store_url=pg_database, keep_enrollment_images=True)
    async with serving(settings) as c:
        for i, image in enumerate(images):
            await enroll(c, f"p{i}", image)
        r = await c.post("/v1/admin/reload", json={"bundle": "v2"}, headers=AUTH)
        assert r.status_code == 202 and r.json()["total"] == 3, r.text
        for _ in range(400):
            status = (await c.get("/v1/admin/reembed", headers=AUTH)).json()
            if status["state"] != "running":
                break
            await asyncio.sleep(0.02)
        assert status["state"] == "done" and status["done"] == 3, status
        for i, image in enumerate(images):
            body = {"images": [base64.b64encode(image).decode()], "top_k": 1}
            r = await c.post("/v1/identify", json=body)
            match = r.json()["results"][0]["matches"][0]
            assert r.json()["model_id"] == V2 and match["identity"] == f"p{i}"
            assert match["similarity"] == pytest.approx(1.0, abs=1e-5)
        assert (await c.get("/v1/model")).json()["gallery"]["orphaned"] == 0
