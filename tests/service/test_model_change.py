"""Enrolled identities are bound to the model that embedded them; no response compares two models' embeddings.

A reload to another model that would orphan enrolled identities is a 409 naming how many, unless forced;
forced, they stay stored (listed as stale) and are never matched until re-enrolled, and come back if the
model that enrolled them is served again. A restart with another bundle is refused or orphans them
(IDEMBED_ON_MODEL_CHANGE). A bundle reusing a name:version with other weights is refused outright.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.client import AsyncIdembedClient, IdembedError
from service.gallery.store import StoreError
from testkit import tiny_bundle
from testkit.service_helpers import API_KEY, b64, serving

pytestmark = pytest.mark.asyncio
AUTH = {"X-API-Key": API_KEY}
V1, V2 = "tiny-digits:1", "tiny-digits:2"


@pytest.fixture
def models(models: Path) -> Path:
    """conftest's v1 and v2, plus tiny-digits:1 again with other weights."""
    root = models
    tiny_bundle.build(root / "retrained", seed=2)
    return root


async def enroll(c: httpx.AsyncClient, name: str, image: bytes) -> dict:
    r = await c.post("/v1/identities", json={"name": name, "images": [b64(image)]}, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()


async def reload(c: httpx.AsyncClient, bundle: str, **extra: object) -> httpx.Response:
    return await c.post("/v1/admin/reload", json={"bundle": bundle, **extra}, headers=AUTH)


async def identified(c: httpx.AsyncClient, image: bytes) -> tuple[str, list[tuple[str, float]]]:
    r = await c.post("/v1/identify", json={"images": [b64(image)], "top_k": 5})
    assert r.status_code == 200, r.text
    matches = [(m["identity"], m["similarity"]) for m in r.json()["results"][0]["matches"]]
    return r.json()["model_id"], matches


async def test_reload_that_would_orphan_identities_is_a_409_naming_them(make_settings, models, tiny) -> None:
    async with serving(make_settings(bundle_path=models / "v1")) as c:
        await enroll(c, "alice", tiny.png(tiny.of_digit(8, 1)[0]))
        await enroll(c, "bob", tiny.png(tiny.of_digit(9, 1)[0]))
        r = await reload(c, "v2")
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "model_change_refused" and "orphan 2 identities" in error["message"]
        assert error["detail"]["orphaned"] == 2 and error["detail"]["enrolled_by_model"] == {V1: 2}
        assert error["detail"]["model_id"] == V2 and error["detail"]["serving_model_id"] == V1
        # Nothing changed: the old model serves and still matches both.
        model_id, matches = await identified(c, tiny.png(tiny.of_digit(8, 1)[0]))
        assert model_id == V1 and matches[0] == ("alice", pytest.approx(1.0, abs=1e-5))
        assert (await c.get("/v1/model")).json()["gallery"] == {"centers": 8, "enrolled": 2, "orphaned": 0}


async def test_forced_reload_orphans_them_until_their_model_serves_again(make_settings, models, tiny) -> None:
    eight = tiny.png(tiny.of_digit(8, 1)[0])
    async with serving(make_settings(bundle_path=models / "v1")) as c:
        await enroll(c, "alice", eight)
        r = await reload(c, "v2", force=True)
        assert r.status_code == 200 and r.json()["orphaned"] == 1, r.text
        # Never matched by the new model, but kept and listed as stale.
        assert await identified(c, eight) == (V2, [])
        page = (await c.get("/v1/identities")).json()
        assert [(i["name"], i["model_id"], i["stale"]) for i in page["items"]] == [("alice", V1, True)]
        assert (await c.get("/v1/identities/alice")).json()["stale"] is True
        assert (await c.get("/v1/model")).json()["gallery"] == {"centers": 8, "enrolled": 0, "orphaned": 1}
        # Re-enrolled with the new model, it is matched again (and no longer stale).
        body = {"name": "alice", "images": [b64(eight)], "replace": True}
        r = await c.post("/v1/identities", json=body, headers=AUTH)
        assert r.status_code == 201 and r.json()["model_id"] == V2 and r.json()["stale"] is False
        await enroll(c, "carol", tiny.png(tiny.of_digit(9, 1)[0]))
        model_id, matches = await identified(c, eight)
        assert model_id == V2 and matches[0] == ("alice", pytest.approx(1.0, abs=1e-5))
        # Back to v1: v2's two identities would be orphaned, so that is refused too...
        assert (await reload(c, "v1")).status_code == 409
        # ...and, forced, v1 matches nothing v2 enrolled.
        r = await reload(c, "v1", force=True)
        assert r.status_code == 200 and r.json()["orphaned"] == 2
        assert await identified(c, eight) == (V1, [])


async def test_a_model_that_enrolled_nothing_is_reloaded_freely_and_its_identities_come_back(
    make_settings, models, tiny
) -> None:
    eight = tiny.png(tiny.of_digit(8, 1)[0])
    async with serving(make_settings(bundle_path=models / "v1")) as c:
        await enroll(c, "alice", eight)
        assert (await reload(c, "v2", force=True)).status_code == 200
        # v2 enrolled nothing: going back orphans nobody, and v1's identity is matched again.
        r = await reload(c, "v1")
        assert r.status_code == 200 and r.json()["orphaned"] == 0, r.text
        model_id, matches = await identified(c, eight)
        assert model_id == V1 and matches[0] == ("alice", pytest.approx(1.0, abs=1e-5))
        assert (await c.get("/v1/identities/alice")).json()["stale"] is False


async def test_same_name_version_with_other_weights_is_refused_even_forced(
    make_settings, models, tiny
) -> None:
    async with serving(make_settings(bundle_path=models / "v1")) as c:
        await enroll(c, "alice", tiny.png(tiny.of_digit(8, 1)[0]))
        for force in (False, True):
            r = await reload(c, "retrained", force=force)
            assert r.status_code == 409 and "new version" in r.json()["error"]["message"], r.text
        assert (await c.post("/v1/embed", json={"images": [b64(tiny.png(0))]})).json()["model_id"] == V1


async def test_concurrent_identify_during_reloads_never_scores_across_models(
    make_settings, models, tiny
) -> None:
    """Each model enrolls the same image under its own name; under load across forced reloads back and
    forth, every response names only its own model's identity, at similarity 1 (its own embedding)."""
    image = tiny.png(tiny.of_digit(8, 1)[0])
    own = {V1: "enrolled-by-v1", V2: "enrolled-by-v2"}
    async with serving(make_settings(bundle_path=models / "v1", batch_wait_ms=1.0)) as c:
        await enroll(c, own[V1], image)
        assert (await reload(c, "v2", force=True)).status_code == 200
        await enroll(c, own[V2], image)
        stop = asyncio.Event()
        seen: list[tuple[str, list[tuple[str, float]]]] = []

        async def load() -> None:
            while not stop.is_set():
                seen.append(await identified(c, image))

        async def flip() -> None:
            for target in ["v1", "v2"] * 4:
                r = await reload(c, target, force=True)
                assert r.status_code == 200 and r.json()["orphaned"] == 1, r.text
                await asyncio.sleep(0.01)
            stop.set()

        await asyncio.gather(flip(), *(load() for _ in range(8)))
    assert {model for model, _ in seen} == {V1, V2}
    assert len(seen) > 40
    for model_id, matches in seen:
        assert [name for name, _ in matches] == [own[model_id]], (model_id, matches)
        assert matches[0][1] == pytest.approx(1.0, abs=1e-5)


async def test_restart_with_another_bundle_is_refused_by_default(make_settings, models, tiny) -> None:
    async with serving(make_settings(bundle_path=models / "v1")) as c:
        await enroll(c, "alice", tiny.png(tiny.of_digit(8, 1)[0]))
    app = create_app(make_settings(bundle_path=models / "v2"))
    with pytest.raises(StoreError, match=r"1 identities enrolled by another model .*IDEMBED_ON_MODEL_CHANGE"):
        async with app.router.lifespan_context(app):
            pass
    # The same bundle as before starts fine and still matches.
    async with serving(make_settings(bundle_path=models / "v1")) as c:
        _, matches = await identified(c, tiny.png(tiny.of_digit(8, 1)[0]))
        assert matches[0][0] == "alice"


async def test_restart_with_another_bundle_orphans_when_set(make_settings, models, tiny) -> None:
    eight = tiny.png(tiny.of_digit(8, 1)[0])
    async with serving(make_settings(bundle_path=models / "v1")) as c:
        await enroll(c, "alice", eight)
    async with serving(make_settings(bundle_path=models / "v2", on_model_change="orphan")) as c:
        assert await identified(c, eight) == (V2, [])
        assert (await c.get("/v1/model")).json()["gallery"]["orphaned"] == 1
        assert (await c.get("/v1/identities/alice")).json()["stale"] is True
    # The change was accepted: a later restart with v2 is no model change, and needs no setting.
    async with serving(make_settings(bundle_path=models / "v2")) as c:
        assert await identified(c, eight) == (V2, [])


async def test_restart_with_a_retrained_bundle_under_the_same_id_is_refused(
    make_settings, models, tiny
) -> None:
    async with serving(make_settings(bundle_path=models / "v1")) as c:
        await enroll(c, "alice", tiny.png(tiny.of_digit(8, 1)[0]))
    for policy in ("refuse", "orphan"):
        app = create_app(make_settings(bundle_path=models / "retrained", on_model_change=policy))
        with pytest.raises(StoreError, match="new version"):
            async with app.router.lifespan_context(app):
                pass


async def test_enrollment_racing_a_reload_is_stored_with_the_model_that_embedded_it(
    make_settings, models, tiny
) -> None:
    images = [tiny.png(i) for i in tiny.of_digit(9, 12)]
    async with serving(make_settings(bundle_path=models / "v1")) as c:

        async def enroll_one(i: int) -> dict:
            await asyncio.sleep(0.003 * i)
            return await enroll(c, f"p{i}", images[i])

        reloading = asyncio.create_task(reload(c, "v2", force=True))
        enrolled = await asyncio.gather(*(enroll_one(i) for i in range(len(images))))
        assert (await reloading).status_code == 200
        by_model = {e["name"]: e["model_id"] for e in enrolled}
        page = {i["name"]: i for i in (await c.get("/v1/identities")).json()["items"]}
        for i, image in enumerate(images):
            name = f"p{i}"
            r = await c.post("/v1/identify", json={"images": [b64(image)], "top_k": 12})
            matches = {m["identity"]: m["similarity"] for m in r.json()["results"][0]["matches"]}
            if by_model[name] == V2:
                # Its template is v2's embedding of this very image.
                assert matches[name] == pytest.approx(1.0, abs=1e-5) and page[name]["stale"] is False
            else:
                assert by_model[name] == V1 and name not in matches and page[name]["stale"] is True


@pytest.mark.parametrize("body", [{"bundle": "v2", "force": [1]}, {"bundle": "v2", "force": "maybe"}])
async def test_a_malformed_force_is_a_422(make_settings, models, body) -> None:
    async with serving(make_settings(bundle_path=models / "v1")) as c:
        r = await c.post("/v1/admin/reload", json=body, headers=AUTH)
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text


async def test_typed_client_reloads_with_force(make_settings, models, tiny) -> None:
    app = create_app(make_settings(bundle_path=models / "v1"))
    async with (
        app.router.lifespan_context(app),
        AsyncIdembedClient("http://t", api_key=API_KEY, transport=httpx.ASGITransport(app=app)) as c,
    ):
        await c.enroll("alice", images=[tiny.png(tiny.of_digit(8, 1)[0])])
        with pytest.raises(IdembedError) as refused:
            await c.reload("v2")
        assert refused.value.status == 409 and refused.value.code == "model_change_refused"
        assert refused.value.detail["orphaned"] == 1
        reloaded = await c.reload("v2", force=True)
        assert reloaded.model_id == V2 and reloaded.orphaned == 1
        assert (await c.get_identity("alice")).stale is True
