"""What the app adds to every route (service/app.py, middleware): request ids, the error shape of unknown
routes, the OpenAPI document."""

from __future__ import annotations

import httpx
import pytest

from testkit.http_checks import assert_error

pytestmark = pytest.mark.asyncio


async def test_request_id_is_echoed_or_generated(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = (await client.get("/healthz", headers={"X-Request-ID": "bad id\nwith newline"})).headers
    assert generated["x-request-id"] and "\n" not in generated["x-request-id"]
    again = (await client.get("/healthz")).headers["x-request-id"]
    assert again != generated["x-request-id"]


async def test_unknown_route_uses_the_error_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nope"), 404, "not_found")


async def test_openapi_documents_both_encodings_and_examples(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    content = spec["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert content["application/json"]["schema"]["examples"]
    assert "examples" in spec["components"]["schemas"]["IdentifyResponse"]
    assert "422" in spec["paths"]["/v1/identify"]["post"]["responses"]
