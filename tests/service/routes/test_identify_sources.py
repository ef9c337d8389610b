"""What identify searches (enrolled identities, the bundle's centers, or both) and which threshold decides.

The threshold is the request's, else the calibrated one of the bundle being served, and the same line
decides known/unknown for every source, decides verify, and is the line below which an HNSW search is
retried with a wide beam: never a value frozen when the index was built.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.client import AsyncIdembedClient
from service.core.config import Settings
from service.gallery.ann import make_index
from service.gallery.service import GalleryService
from service.gallery.store import SQLiteIdentityStore
from testkit import tiny_bundle
from testkit.service_helpers import API_KEY, TinyBundle, b64, serving

pytestmark = pytest.mark.asyncio
AUTH = {"X-API-Key": API_KEY}


async def enroll_eights(c: httpx.AsyncClient, tiny: TinyBundle) -> list[int]:
    eights = tiny.of_digit(8, 4)
    files = [("images", (f"{i}.png", tiny.png(i), "image/png")) for i in eights[:3]]
    r = await c.post("/v1/identities", files=files, data={"name": "eight"}, headers=AUTH)
    assert r.status_code == 201, r.text
    return eights


async def test_default_searches_enrolled_identities_only(make_settings, tiny: TinyBundle) -> None:
    async with serving(make_settings()) as c:
        eights = await enroll_eights(c, tiny)
        three = tiny.of_digit(3, 1)[0]
        body = {"images": [b64(tiny.png(eights[3])), b64(tiny.png(three))], "top_k": 10}
        r = await c.post("/v1/identify", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["sources"] == "enrolled"
        for result in r.json()["results"]:
            assert {m["source"] for m in result["matches"]} == {"enrolled"}
        # The probe of a training identity ("3") finds no center to be accepted as: the open-set answer.
        assert [m["identity"] for m in r.json()["results"][1]["matches"]] == ["eight"]


@pytest.mark.parametrize(
    ("sources", "expected"),
    [("centers", {"center"}), ("enrolled", {"enrolled"}), ("both", {"center", "enrolled"})],
)
async def test_request_chooses_sources_in_json_and_multipart(
    make_settings, tiny: TinyBundle, sources: str, expected: set[str]
) -> None:
    async with serving(make_settings()) as c:
        eights = await enroll_eights(c, tiny)
        probe = tiny.png(eights[3])
        as_json = await c.post("/v1/identify", json={"images": [b64(probe)], "top_k": 9, "sources": sources})
        files = [("images", ("q.png", probe, "image/png"))]
        as_form = await c.post("/v1/identify", files=files, data={"top_k": "9", "sources": sources})
        for r in (as_json, as_form):
            assert r.status_code == 200, r.text
            assert r.json()["sources"] == sources
            assert {m["source"] for m in r.json()["results"][0]["matches"]} == expected
        assert as_json.json() == as_form.json()


async def test_server_setting_sets_the_default_and_a_request_overrides_it(make_settings, tiny) -> None:
    async with serving(make_settings(identify_sources="both")) as c:
        await enroll_eights(c, tiny)
        emb = tiny.reference([tiny.of_digit(3, 1)[0]])[0].tolist()
        both = (await c.post("/v1/identify", json={"embeddings": [emb], "top_k": 9})).json()
        assert both["sources"] == "both" and len(both["results"][0]["matches"]) == 9
        assert both["results"][0]["identity"] == "3"  # the training identity's center
        only = (await c.post("/v1/identify", json={"embeddings": [emb], "sources": "enrolled"})).json()
        assert only["sources"] == "enrolled" and only["results"][0]["identity"] != "3"


@pytest.mark.parametrize("sources", ["everything", "", "ENROLLED", 3])
async def test_unknown_sources_are_a_422_in_json_and_multipart(make_settings, tiny, sources) -> None:
    async with serving(make_settings()) as c:
        r = await c.post("/v1/identify", json={"images": [b64(tiny.png(0))], "sources": sources})
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text
        if isinstance(sources, str):
            files = [("images", ("q.png", tiny.png(0), "image/png"))]
            r = await c.post("/v1/identify", files=files, data={"sources": sources})
            assert r.status_code == 422 and set(r.json()["error"]) == {"code", "message", "detail"}


async def test_unknown_sources_setting_stops_start_up(make_settings) -> None:
    with pytest.raises(ValueError, match="identify_sources"):
        make_settings(identify_sources="all")


async def test_typed_client_sends_sources(make_settings, tiny: TinyBundle) -> None:
    app = create_app(make_settings())
    async with (
        app.router.lifespan_context(app),
        AsyncIdembedClient("http://t", api_key=API_KEY, transport=httpx.ASGITransport(app=app)) as c,
    ):
        result = await c.identify(images=[tiny.png(tiny.of_digit(3, 1)[0])], top_k=3, sources="centers")
        assert result.sources == "centers" and result.results[0].identity == "3"
        assert (await c.identify(images=[tiny.png(0)])).sources == "enrolled"


async def test_identify_and_verify_use_the_served_bundles_threshold_after_a_reload(
    make_settings, tiny: TinyBundle, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny.path, models / "current")
    tiny_bundle.build(models / "recalibrated", threshold=0.95)  # the same model, another threshold
    a, b = tiny.of_digit(4, 2)
    async with serving(make_settings(bundle_path=models / "current")) as c:
        sides = {"image_a": b64(tiny.png(a)), "image_b": b64(tiny.png(b))}
        query = {"images": [sides["image_a"]], "sources": "both"}
        assert (await c.post("/v1/verify", json=sides)).json()["threshold"] == 0.8
        assert (await c.post("/v1/identify", json=query)).json()["threshold"] == 0.8
        r = await c.post("/v1/admin/reload", json={"bundle": "recalibrated"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["orphaned"] == 0, r.text  # same model: nothing orphaned
        assert (await c.post("/v1/verify", json=sides)).json()["threshold"] == 0.95
        assert (await c.post("/v1/identify", json=query)).json()["threshold"] == 0.95
        # A request's own threshold beats the bundle's, in both.
        assert (await c.post("/v1/verify", json={**sides, "threshold": 0.5})).json()["threshold"] == 0.5
        assert (await c.post("/v1/identify", json={**query, "threshold": 0.5})).json()["threshold"] == 0.5


# --- the HNSW retry line -----------------------------------------------------------------------------------

CLUSTERS, PER_CLUSTER = 30, 10


def clustered(seed: int = 0) -> np.ndarray:
    """300 unit vectors in 30 tight clusters: a graph miss lands on a sibling at cosine ~0.9, above the
    bundle's 0.8 and below 0.999."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(CLUSTERS, tiny_bundle.DIM))
    v = np.repeat(centers / np.linalg.norm(centers, axis=1, keepdims=True), PER_CLUSTER, axis=0)
    v = v + rng.normal(scale=0.1, size=v.shape)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def narrow_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """An HNSW gallery with a beam of 1: it misses about one probe in ten, each found again only by the
    wide retry, which runs only for probes whose best match is below the line the gallery passes."""
    factory = partial(make_index, "hnsw", connectivity=4, expansion_add=16, expansion_search=1, dtype="f32")
    monkeypatch.setattr(GalleryService, "index_factory", lambda self: factory)


def prefill(store_path: Path, vectors: np.ndarray) -> None:
    store = SQLiteIdentityStore(store_path, tiny_bundle.DIM)
    for i, v in enumerate(vectors):
        store.add(f"id{i}", v, image_count=1, model_id="tiny-digits:1")
    store.close()


async def identify_all(c: httpx.AsyncClient, vectors: np.ndarray, **options: object) -> list[str | None]:
    names: list[str | None] = []
    for start in range(0, len(vectors), 50):
        body = {"embeddings": vectors[start : start + 50].tolist(), "top_k": 1, **options}
        r = await c.post("/v1/identify", json=body)
        assert r.status_code == 200, r.text
        names += [m["matches"][0]["identity"] if m["matches"] else None for m in r.json()["results"]]
    return names


async def test_hnsw_retry_uses_the_requests_threshold(
    make_settings: Callable[..., Settings], tmp_path: Path, narrow_graph: None
) -> None:
    vectors = clustered()
    prefill(tmp_path / "identities.sqlite3", vectors)
    want = [f"id{i}" for i in range(len(vectors))]
    async with serving(make_settings(gallery_index="hnsw")) as c:
        at_bundle_line = await identify_all(c, vectors)
        # Misses that land on a sibling above 0.8 are never retried at the bundle's line...
        assert sum(a != b for a, b in zip(at_bundle_line, want, strict=True)) > 0
        # ...and are, at the request's: every probe finds itself.
        assert await identify_all(c, vectors, threshold=0.999) == want


async def test_hnsw_retry_follows_a_reload_to_a_recalibrated_bundle(
    make_settings: Callable[..., Settings], tiny: TinyBundle, tmp_path: Path, narrow_graph: None
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny.path, models / "current")
    tiny_bundle.build(models / "strict", threshold=0.999)
    vectors = clustered(seed=1)
    prefill(tmp_path / "identities.sqlite3", vectors)
    want = [f"id{i}" for i in range(len(vectors))]
    settings = make_settings(bundle_path=models / "current", gallery_index="hnsw")
    async with serving(settings) as c:
        assert await identify_all(c, vectors) != want
        r = await c.post("/v1/admin/reload", json={"bundle": "strict"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert await identify_all(c, vectors) == want
