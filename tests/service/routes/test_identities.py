"""/v1/identities (service/api/routes/identities.py): enroll, list, get, delete, names and write keys."""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import pytest

from service.app import create_app
from testkit.http_checks import AUTH, assert_error
from testkit.service_helpers import TinyBundle, b64

pytestmark = pytest.mark.asyncio


async def test_enroll_then_identify_returns_the_enrolled_identity(
    client: httpx.AsyncClient, tiny: TinyBundle
) -> None:
    nines = tiny.of_digit(9, 4)
    body = {"name": "nine", "images": [b64(tiny.png(i)) for i in nines[:3]], "metadata": {"who": "test"}}
    r = await client.post("/v1/identities", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    assert (
        r.json()["image_count"] == 3
        and r.json()["replaced"] is False
        and r.json()["metadata"] == {"who": "test"}
    )
    probe = (
        await client.post("/v1/identify", json={"images": [b64(tiny.png(nines[3]))], "top_k": 10})
    ).json()
    matches = probe["results"][0]["matches"]
    assert {"identity": "nine", "source": "enrolled"} in [
        {"identity": m["identity"], "source": m["source"]} for m in matches
    ]


async def test_enroll_multipart_with_metadata_json(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    files = [("images", ("a.png", tiny.png(1), "image/png")), ("images", ("b.png", tiny.png(2), "image/png"))]
    data = {"name": "pair", "metadata": json.dumps({"k": 1}), "replace": "false"}
    r = await client.post("/v1/identities", files=files, data=data, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["image_count"] == 2 and r.json()["metadata"] == {"k": 1}


async def test_enroll_duplicate_is_409_unless_replace(client: httpx.AsyncClient) -> None:
    emb = [[1.0] + [0.0] * 15]
    assert (
        await client.post("/v1/identities", json={"name": "dup", "embeddings": emb}, headers=AUTH)
    ).status_code == 201
    assert_error(
        await client.post("/v1/identities", json={"name": "dup", "embeddings": emb}, headers=AUTH), 409
    )
    again = await client.post(
        "/v1/identities", json={"name": "dup", "embeddings": emb, "replace": True}, headers=AUTH
    )
    assert again.status_code == 201 and again.json()["replaced"] is True


async def test_writes_without_or_with_wrong_key_are_401(client: httpx.AsyncClient) -> None:
    body = {"name": "x", "embeddings": [[1.0] * 16]}
    assert_error(await client.post("/v1/identities", json=body), 401, "unauthorized")
    assert_error(await client.post("/v1/identities", json=body, headers={"X-API-Key": "wrong-key-000"}), 401)
    assert_error(await client.delete("/v1/identities/x"), 401)
    assert_error(await client.post("/v1/admin/reload"), 401)


async def test_writes_are_refused_when_no_keys_are_configured(make_settings) -> None:
    app = create_app(make_settings(api_keys=[]))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        r = await c.post("/v1/identities", json={"name": "x", "embeddings": [[1.0] * 16]}, headers=AUTH)
        assert "IDEMBED_API_KEYS" in assert_error(r, 401)["message"]


async def test_reads_can_require_a_key(make_settings, tiny: TinyBundle) -> None:
    app = create_app(make_settings(require_key_for_reads=True))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        assert_error(await c.post("/v1/embed", json={"images": [b64(tiny.png(0))]}), 401)
        assert (
            await c.post("/v1/embed", json={"images": [b64(tiny.png(0))]}, headers=AUTH)
        ).status_code == 200
        assert (await c.get("/healthz")).status_code == 200


@pytest.mark.parametrize("name", ["a/b", "..", " padded", "tab\there", ""])
async def test_bad_identity_names_are_422(client: httpx.AsyncClient, name: str) -> None:
    r = await client.post("/v1/identities", json={"name": name, "embeddings": [[1.0] * 16]}, headers=AUTH)
    assert_error(r, 422)


async def test_unicode_name_round_trips_through_the_path(client: httpx.AsyncClient) -> None:
    name = "Zoë 王 ✓"
    r = await client.post("/v1/identities", json={"name": name, "embeddings": [[1.0] * 16]}, headers=AUTH)
    assert r.status_code == 201, r.text
    got = await client.get(f"/v1/identities/{quote(name, safe='')}")
    assert got.status_code == 200 and got.json()["name"] == name
    assert (await client.delete(f"/v1/identities/{quote(name, safe='')}", headers=AUTH)).status_code == 204


async def test_list_pages_and_get_and_delete(client: httpx.AsyncClient) -> None:
    for i in range(5):
        emb = [[float(i + 1)] + [1.0] * 15]
        assert (
            await client.post("/v1/identities", json={"name": f"p{i}", "embeddings": emb}, headers=AUTH)
        ).is_success
    page = (await client.get("/v1/identities", params={"offset": 1, "limit": 2})).json()
    assert page["total"] == 5 and [i["name"] for i in page["items"]] == ["p1", "p2"]
    assert (await client.get("/v1/identities/p3")).json()["image_count"] == 1
    assert (await client.delete("/v1/identities/p3", headers=AUTH)).status_code == 204
    assert_error(await client.get("/v1/identities/p3"), 404, "identity_not_found")
    assert_error(await client.delete("/v1/identities/p3", headers=AUTH), 404)
    assert_error(await client.get("/v1/identities", params={"limit": 0}), 422)
