"""POST /v1/admin/reload (service/api/routes/admin.py): a good bundle is swapped in without failing requests
in flight; a bad one, or a bad body, is refused."""

from __future__ import annotations

import asyncio
import base64
import shutil
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from testkit import tiny_bundle
from testkit.http_checks import AUTH, assert_error
from testkit.service_helpers import TinyBundle

pytestmark = pytest.mark.asyncio


@pytest.fixture
def models(tmp_path: Path, tiny: TinyBundle) -> Path:
    root = tmp_path / "models"
    shutil.copytree(tiny.path, root / "current")
    tiny_bundle.build(root / "v2", seed=1, version="2")
    tampered = root / "tampered"
    shutil.copytree(tiny.path, tampered)
    data = bytearray((tampered / "centers.npy").read_bytes())
    data[-1] ^= 0x01
    (tampered / "centers.npy").write_bytes(bytes(data))
    return root


async def test_reload_swaps_model_and_keeps_enrolled(make_settings, models: Path, tiny: TinyBundle) -> None:
    app = create_app(make_settings(bundle_path=models / "current"))
    png = base64.b64encode(tiny.png(0)).decode()
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        await c.post("/v1/identities", json={"name": "kept", "embeddings": [[1.0] * 16]}, headers=AUTH)
        before = (await c.post("/v1/embed", json={"images": [png]})).json()
        # The same model again (a re-read of its bundle) keeps every identity it enrolled.
        r = await c.post("/v1/admin/reload", json={"bundle": "current"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["orphaned"] == 0
        assert (await c.get("/v1/model")).json()["gallery"]["enrolled"] == 1
        # Another model would orphan "kept" (its template is tiny-digits:1's): forced, it is swapped in.
        r = await c.post("/v1/admin/reload", json={"bundle": "v2", "force": True}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["model_id"] == "tiny-digits:2" and r.json()["previous_model_id"] == "tiny-digits:1"
        assert r.json()["orphaned"] == 1
        after = (await c.post("/v1/embed", json={"images": [png]})).json()
        assert after["model_id"] == "tiny-digits:2" and after["embeddings"] != before["embeddings"]
        assert (await c.get("/v1/model")).json()["gallery"] == {"centers": 8, "enrolled": 0, "orphaned": 1}
        assert 'idembed_model_info{model_id="tiny-digits:2"} 1.0' in (await c.get("/metrics")).text


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("tampered", "sha256 mismatch"),
        ("missing", "does not exist"),
        ("../outside", "outside the models folder"),
    ],
)
async def test_bad_reload_is_refused_and_old_model_keeps_serving(
    make_settings, models: Path, tiny: TinyBundle, target: str, problem: str
) -> None:
    app = create_app(make_settings(bundle_path=models / "current"))
    png = base64.b64encode(tiny.png(0)).decode()
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        r = await c.post("/v1/admin/reload", json={"bundle": target}, headers=AUTH)
        assert r.status_code == 422 and problem in r.json()["error"]["message"]
        ok = await c.post("/v1/embed", json={"images": [png]})
        assert ok.status_code == 200 and ok.json()["model_id"] == "tiny-digits:1"
        assert (await c.get("/readyz")).status_code == 200


async def test_requests_in_flight_during_reload_all_succeed(
    make_settings, models: Path, tiny: TinyBundle
) -> None:
    app = create_app(make_settings(bundle_path=models / "current", batch_wait_ms=5.0))
    pngs = [base64.b64encode(tiny.png(i)).decode() for i in range(40)]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):

        async def embed(i: int) -> httpx.Response:
            await asyncio.sleep(0.002 * i)
            return await c.post("/v1/embed", json={"images": [pngs[i]]})

        reload = asyncio.create_task(c.post("/v1/admin/reload", json={"bundle": "v2"}, headers=AUTH))
        responses = await asyncio.gather(*(embed(i) for i in range(40)))
        assert (await reload).status_code == 200
    assert [r.status_code for r in responses] == [200] * 40
    assert {r.json()["model_id"] for r in responses} <= {"tiny-digits:1", "tiny-digits:2"}


async def test_reload_with_malformed_or_foreign_body_is_a_client_error(client: httpx.AsyncClient) -> None:
    bad_json = await client.post(
        "/v1/admin/reload", content=b"\xff{", headers={**AUTH, "content-type": "application/json"}
    )
    assert_error(bad_json, 422, "validation_error")
    text = await client.post(
        "/v1/admin/reload", content=b"default", headers={**AUTH, "content-type": "text/plain"}
    )
    assert_error(text, 415)
