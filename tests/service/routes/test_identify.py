"""POST /v1/identify (service/api/routes/identify.py): matches, unknown rejection, its documented errors."""

from __future__ import annotations

import httpx
import pytest

from testkit.http_checks import assert_error
from testkit.service_helpers import TinyBundle, b64

pytestmark = pytest.mark.asyncio


async def test_identify_image_finds_its_digit_center(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    idx = tiny.of_digit(3, 1)[0]
    body = {"images": [b64(tiny.png(idx))], "top_k": 3, "sources": "centers"}
    r = await client.post("/v1/identify", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["sources"] == "centers"
    result = r.json()["results"][0]
    assert len(result["matches"]) == 3 and result["matches"][0]["source"] == "center"
    sims = [m["similarity"] for m in result["matches"]]
    assert sims == sorted(sims, reverse=True)
    assert result["identity"] == result["matches"][0]["identity"] == "3"
    assert r.json()["threshold"] == 0.8


async def test_identify_below_threshold_is_unknown(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    body = {"images": [b64(tiny.png(0))], "threshold": 0.9999, "sources": "both"}
    r = await client.post("/v1/identify", json=body)
    result = r.json()["results"][0]
    assert result["identity"] is None and result["unknown"] is True and result["matches"]


async def test_identify_by_embedding_equals_identify_by_image(
    client: httpx.AsyncClient, tiny: TinyBundle
) -> None:
    query = {"images": [b64(tiny.png(7))], "sources": "both"}
    by_image = (await client.post("/v1/identify", json=query)).json()
    emb = tiny.reference([7])[0].tolist()
    by_emb = (await client.post("/v1/identify", json={"embeddings": [emb], "sources": "both"})).json()
    assert [m["identity"] for m in by_emb["results"][0]["matches"]] == [
        m["identity"] for m in by_image["results"][0]["matches"]
    ]


@pytest.mark.parametrize("top_k", [0, 101, -3])
async def test_identify_top_k_out_of_range_is_422(
    client: httpx.AsyncClient, tiny: TinyBundle, top_k: int
) -> None:
    r = await client.post("/v1/identify", json={"images": [b64(tiny.png(0))], "top_k": top_k})
    assert_error(r, 422)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
async def test_identify_nan_or_inf_embedding_is_422(client: httpx.AsyncClient, bad: str) -> None:
    body = '{"embeddings": [[' + ", ".join(["0.1"] * 15 + [bad]) + "]]}"
    r = await client.post("/v1/identify", content=body, headers={"content-type": "application/json"})
    assert_error(r, 422)


async def test_identify_float32_overflow_is_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/identify", json={"embeddings": [[1e300] + [0.0] * 15]})
    assert_error(r, 422, "invalid_input")


async def test_identify_wrong_dimension_is_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/identify", json={"embeddings": [[0.1, 0.2, 0.3]]})
    assert "16" in assert_error(r, 422, "invalid_input")["message"]


async def test_identify_needs_exactly_one_input_kind(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    assert_error(await client.post("/v1/identify", json={"top_k": 1}), 422)
    both = {"images": [b64(tiny.png(0))], "embeddings": [[0.1] * 16]}
    assert_error(await client.post("/v1/identify", json=both), 422)


async def test_identify_multipart_with_form_fields(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    files = [("images", ("q.png", tiny.png(1), "image/png"))]
    data = {"top_k": "2", "threshold": "0.1", "sources": "centers"}
    r = await client.post("/v1/identify", files=files, data=data)
    assert r.status_code == 200, r.text
    assert len(r.json()["results"][0]["matches"]) == 2 and r.json()["threshold"] == 0.1
    assert r.json()["sources"] == "centers"
