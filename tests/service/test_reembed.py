"""Kept enrollment images (IDEMBED_KEEP_ENROLLMENT_IMAGES) let a new model re-embed the gallery instead of
orphaning it: in the background on a reload (the old model serves until one swap), before serving at start-up.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from service import runtime as runtime_module
from service.gallery.gallery import Gallery
from service.gallery.index import ExactIndex
from service.gallery.store import SQLiteIdentityStore
from testkit import tiny_bundle
from testkit.service_helpers import API_KEY, TinyBundle, b64, serving

pytestmark = pytest.mark.asyncio
AUTH = {"X-API-Key": API_KEY}
V1, V2 = "tiny-digits:1", "tiny-digits:2"


async def enroll(c: httpx.AsyncClient, name: str, image: bytes, **extra: object) -> httpx.Response:
    body = {"name": name, "images": [b64(image)], **extra}
    r = await c.post("/v1/identities", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    return r


async def top(c: httpx.AsyncClient, image: bytes) -> tuple[str, list[tuple[str, float]]]:
    r = await c.post("/v1/identify", json={"images": [b64(image)], "top_k": 50})
    assert r.status_code == 200, r.text
    return r.json()["model_id"], [(m["identity"], m["similarity"]) for m in r.json()["results"][0]["matches"]]


async def wait_done(c: httpx.AsyncClient) -> dict:
    for _ in range(400):
        status = (await c.get("/v1/admin/reembed", headers=AUTH)).json()
        if status["state"] != "running":
            return status
        await asyncio.sleep(0.02)
    raise AssertionError(f"re-embedding still running: {status}")


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Holds the background re-embedding at its first batch until the test sets the event."""
    release = threading.Event()
    original = runtime_module.embed_templates

    def gated(*args: object, **kwargs: object) -> object:
        assert release.wait(30), "the test never released the re-embedding"
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime_module, "embed_templates", gated)
    return release


def digit_images(tiny: TinyBundle, digit: int, count: int) -> list[bytes]:
    return [tiny.png(i) for i in tiny.of_digit(digit, count)]


async def test_reload_re_embeds_kept_images_in_the_background(make_settings, models, tiny) -> None:
    images = digit_images(tiny, 9, 6)
    settings = make_settings(bundle_path=models / "v1", keep_enrollment_images=True, max_batch_size=2)
    async with serving(settings) as c:
        assert (await c.get("/v1/admin/reembed", headers=AUTH)).json()["state"] == "idle"
        for i, image in enumerate(images):
            await enroll(c, f"p{i}", image)
        # Enrolled from an embedding: nothing to re-embed it from.
        emb = tiny.reference([tiny.of_digit(8, 1)[0]])[0].tolist()
        r = await c.post("/v1/identities", json={"name": "from-emb", "embeddings": [emb]}, headers=AUTH)
        assert r.status_code == 201
        r = await c.post("/v1/admin/reload", json={"bundle": "v2"}, headers=AUTH)
        assert r.status_code == 409, r.text
        detail = r.json()["error"]["detail"]
        assert detail["orphaned"] == 1 and detail["reembeddable"] == 6
        r = await c.post("/v1/admin/reload", json={"bundle": "v2", "force": True}, headers=AUTH)
        assert r.status_code == 202, r.text
        assert r.json()["state"] == "running" and r.json()["total"] == 6 and r.json()["orphaned"] == 1
        status = await wait_done(c)
        assert status["state"] == "done" and status["done"] == 6 and status["skipped"] == 0, status
        assert status["model_id"] == V2 and status["finished_at"] is not None
        # Every identity with images now has v2's template: v2 finds each at similarity 1 (one image each).
        for i, image in enumerate(images):
            model_id, matches = await top(c, image)
            assert model_id == V2 and matches[0] == (f"p{i}", pytest.approx(1.0, abs=1e-5))
        page = {i["name"]: i for i in (await c.get("/v1/identities")).json()["items"]}
        assert {n for n, i in page.items() if i["stale"]} == {"from-emb"}
        assert page["p0"]["model_id"] == V2
        gallery = (await c.get("/v1/model")).json()["gallery"]
        assert gallery == {"centers": 8, "enrolled": 6, "orphaned": 1}
        metrics = (await c.get("/metrics")).text
        assert 'idembed_reembed_identities{state="done"} 6.0' in metrics


async def test_with_every_identity_kept_no_force_is_needed(make_settings, models, tiny) -> None:
    settings = make_settings(bundle_path=models / "v1", keep_enrollment_images=True)
    async with serving(settings) as c:
        image = tiny.png(tiny.of_digit(9, 1)[0])
        await enroll(c, "nine", image)
        r = await c.post("/v1/admin/reload", json={"bundle": "v2"}, headers=AUTH)
        assert r.status_code == 202, r.text
        assert (await wait_done(c))["state"] == "done"
        assert (await top(c, image)) == (V2, [("nine", pytest.approx(1.0, abs=1e-5))])


async def test_old_model_serves_during_the_re_embedding_and_nothing_mixes(
    make_settings, models, tiny, gate: threading.Event
) -> None:
    """Identify and enroll under load while 40 identities are re-embedded two at a time: before the swap
    answers are v1's, after it v2's, every match at similarity 1 (the probe is the enrolled image, embedded
    by the model that answers); an identity enrolled by v1 during the job is re-embedded at the commit."""
    images = [tiny.png(i) for i in range(40)]
    settings = make_settings(bundle_path=models / "v1", keep_enrollment_images=True, max_batch_size=2)
    async with serving(settings) as c:
        for i, image in enumerate(images):
            await enroll(c, f"p{i}", image)
        probe_index = 7
        probe = images[probe_index]
        seen: list[tuple[str, list[tuple[str, float]]]] = []
        r = await c.post("/v1/admin/reload", json={"bundle": "v2"}, headers=AUTH)
        assert r.status_code == 202, r.text
        late = tiny.png(1000)  # not one of the 40
        late_enrolled = await enroll(c, "late", late)  # by v1, while v2 re-embeds

        async def load() -> None:
            while (await c.get("/v1/admin/reembed", headers=AUTH)).json()["state"] == "running":
                seen.append(await top(c, probe))
            seen.append(await top(c, probe))

        async def release_later() -> None:
            while len(seen) < 20:
                await asyncio.sleep(0.005)
            gate.set()

        await asyncio.gather(release_later(), *(load() for _ in range(4)))
        assert (await wait_done(c))["state"] == "done"
        assert late_enrolled.json()["model_id"] == V1
        assert {model for model, _ in seen} == {V1, V2} and seen[0][0] == V1 and seen[-1][0] == V2
        for model_id, matches in seen:
            # The probe's own identity is its exact match, whichever model answered.
            assert matches[0] == (f"p{probe_index}", pytest.approx(1.0, abs=1e-5)), (model_id, matches)
        assert (await top(c, late))[1][0] == ("late", pytest.approx(1.0, abs=1e-5))
        assert (await c.get("/v1/identities/late")).json()["model_id"] == V2


async def test_a_reload_while_re_embedding_is_refused(
    make_settings, models, tiny, gate: threading.Event
) -> None:
    settings = make_settings(bundle_path=models / "v1", keep_enrollment_images=True)
    async with serving(settings) as c:
        await enroll(c, "p0", tiny.png(0))
        assert (await c.post("/v1/admin/reload", json={"bundle": "v2"}, headers=AUTH)).status_code == 202
        r = await c.post("/v1/admin/reload", json={"bundle": "v1"}, headers=AUTH)
        assert r.status_code == 409 and "being re-embedded" in r.json()["error"]["message"], r.text
        status = (await c.get("/v1/admin/reembed", headers=AUTH)).json()
        assert status["state"] == "running" and status["done"] == 0 and status["total"] == 1
        assert (await top(c, tiny.png(0)))[0] == V1  # the old model serves meanwhile
        gate.set()
        assert (await wait_done(c))["state"] == "done"
        assert (await top(c, tiny.png(0)))[0] == V2


async def test_restart_with_another_bundle_re_embeds_before_serving(make_settings, models, tiny) -> None:
    image = tiny.png(tiny.of_digit(9, 1)[0])
    async with serving(make_settings(bundle_path=models / "v1", keep_enrollment_images=True)) as c:
        await enroll(c, "nine", image)
    # Every v1 identity has its image: the default policy (refuse) has nothing to refuse.
    async with serving(make_settings(bundle_path=models / "v2", keep_enrollment_images=True)) as c:
        assert await top(c, image) == (V2, [("nine", pytest.approx(1.0, abs=1e-5))])
        assert (await c.get("/v1/identities/nine")).json() | {"created_at": None} == {
            "name": "nine",
            "image_count": 1,
            "model_id": V2,
            "metadata": {},
            "created_at": None,
            "stale": False,
        }


async def test_images_are_not_kept_unless_asked(make_settings, tiny: TinyBundle, tmp_path: Path) -> None:
    for keep in (False, True):
        store_url = f"sqlite:///{tmp_path / f'keep-{keep}.sqlite3'}"
        async with serving(make_settings(keep_enrollment_images=keep, store_url=store_url)) as c:
            await enroll(c, "nine", tiny.png(1))
        store = SQLiteIdentityStore(tmp_path / f"keep-{keep}.sqlite3", tiny_bundle.DIM)
        record = store.get("nine")
        assert record is not None
        assert store.images_of([record.key]) == ({record.key: [tiny.png(1)]} if keep else {})
        store.close()


def unit(i: int, dim: int = 4) -> np.ndarray:
    return np.eye(dim, dtype=np.float32)[i]


async def test_gallery_commit_settles_writes_made_during_the_re_embedding(tmp_path: Path) -> None:
    """Deleted meanwhile: not resurrected. Re-enrolled by the old model: re-embedded at the commit.
    Enrolled without images: orphaned. Untouched: the template computed in the background."""
    store = SQLiteIdentityStore(tmp_path / "s.sqlite3", 4)
    gallery = Gallery(np.stack([unit(0)]), ["c"], store, model_id="old")
    for name, i in (("kept", 1), ("gone", 2), ("redone", 3)):
        gallery.enroll(name, unit(i)[None], model_id="old", images=[name.encode()])
    records = {r.name: r for r in store.list()}
    gallery.prepare_model("new", np.stack([unit(0)]), ["c"], ExactIndex(4))
    new_template = {b"kept": unit(0), b"gone": unit(1), b"redone": unit(2), b"redone-2": unit(3)}
    gallery.add_reembedded([records[n] for n in ("kept", "gone", "redone")], [unit(0), unit(1), unit(2)])
    gallery.delete("gone")
    gallery.enroll("redone", unit(1)[None], model_id="old", replace=True, images=[b"redone-2"])
    gallery.enroll("no-images", unit(2)[None], model_id="old")

    def embed(groups: list[list[bytes]]) -> list[np.ndarray | None]:
        return [new_template[g[0]] for g in groups]

    replaced, settled = gallery.commit_reembedded("old", embed)
    assert (replaced, settled) == (2, 3) and gallery.model_id == "new"
    names = {m.name: m.similarity for m in gallery.search(np.eye(4, dtype=np.float32), 4)[0]}
    assert "gone" not in names and "no-images" not in names
    assert gallery.search(unit(3)[None], 1, sources="enrolled")[0][0].name == "redone"
    assert gallery.search(unit(0)[None], 1, sources="enrolled")[0][0].name == "kept"
    assert store.count_by_model() == {"new": 2, "old": 1}
    store.close()
