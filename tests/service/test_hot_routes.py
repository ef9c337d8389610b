"""Hot routes (embed, identify, verify) skip FastAPI's routing but answer exactly as FastAPI would."""

from __future__ import annotations

import base64
from collections.abc import Callable

import httpx
import pytest
from fastapi.routing import APIRoute

from service.api.hot_routes import HOT_PATHS
from service.app import create_app
from service.core.config import Settings
from testkit.service_helpers import TinyBundle

pytestmark = pytest.mark.asyncio


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths of the requests that went through FastAPI's route handling."""
    seen: list[str] = []
    original = APIRoute.handle

    async def counting(self: APIRoute, scope: dict, receive: object, send: object) -> None:
        seen.append(scope["path"])
        await original(self, scope, receive, send)  # type: ignore[arg-type]

    monkeypatch.setattr(APIRoute, "handle", counting)
    return seen


async def test_hot_routes_bypass_fastapi_routing_and_others_do_not(
    client: httpx.AsyncClient, tiny: TinyBundle, routed: list[str]
) -> None:
    image = base64.b64encode(tiny.png(0)).decode()
    r = await client.post("/v1/embed", json={"images": [image]})
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 1
    r = await client.post("/v1/identify", json={"images": [image], "top_k": 2, "sources": "both"})
    assert r.status_code == 200 and len(r.json()["results"][0]["matches"]) == 2
    r = await client.post("/v1/verify", json={"image_a": image, "image_b": image})
    assert r.status_code == 200 and r.json()["same"] is True
    assert routed == []
    assert (await client.get("/v1/model")).status_code == 200
    assert (await client.get("/v1/embed")).status_code == 405  # other methods still go to FastAPI
    assert routed == ["/v1/model", "/v1/embed"]


async def test_hot_route_errors_use_the_app_error_shape_and_metrics_use_the_route_template(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/v1/embed", json={"images": ["not base64!"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"
    assert r.headers["x-request-id"]
    r = await client.post("/v1/identify", json={"embeddings": [[1.0, 0.0, 0.0]]})  # wrong dim
    assert r.status_code == 422 and set(r.json()["error"]) == {"code", "message", "detail"}
    metrics = (await client.get("/metrics")).text
    for path in HOT_PATHS[:2]:
        assert f'route="{path}"' in metrics


async def test_unexpected_failure_in_a_hot_route_is_a_json_500_not_a_traceback(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(make_settings())

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as c,
    ):
        monkeypatch.setattr(app.state.runtime, "embed_images", broken)
        r = await c.post("/v1/embed", json={"images": ["aGVsbG8="]})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error" and "disk on fire" not in r.text
