"""Hot routes (embed, identify, verify) skip FastAPI's routing but answer exactly as FastAPI would."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.routing import APIRoute

from service import app as app_module
from service.api.deps import require_read_key
from service.api.hot_routes import HOT_PATHS
from service.api.routes import embed as embed_routes
from service.api.routes import verify as verify_routes
from service.api.schemas import VerifyRequest
from service.app import create_app
from service.core.config import Settings
from testkit.service_helpers import API_KEY, TinyBundle, b64

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


# --- the hot path answers exactly as FastAPI's routing would, and refuses to start where it could not -----

WRITE_ONLY_KEY = "write-only-key-0123456789"
DIM = 3  # the tiny bundle's embedding dim


def _cases(image: str, other: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, path, httpx request arguments) for every hot route, answers and errors alike."""
    key = {"X-API-Key": API_KEY}
    emb = [[0.5, 0.25, 1.0]]
    multipart = {"files": [("images", ("a.png", base64.b64decode(image), "image/png"))], "headers": key}
    cases: list[tuple[str, str, dict[str, Any]]] = []
    for path, good in (
        ("/v1/embed", {"images": [image]}),
        ("/v1/identify", {"images": [image], "top_k": 3, "sources": "both"}),
        ("/v1/verify", {"image_a": image, "image_b": other}),
    ):
        cases += [
            ("ok", path, {"json": good, "headers": key}),
            ("missing key", path, {"json": good}),
            ("wrong key", path, {"json": good, "headers": {"X-API-Key": "not-a-key-0123456789"}}),
            ("key without read scope", path, {"json": good, "headers": {"X-API-Key": WRITE_ONLY_KEY}}),
            (
                "bad JSON",
                path,
                {"content": b'{"images": [', "headers": {**key, "content-type": "application/json"}},
            ),
            ("JSON not an object", path, {"json": [1, 2], "headers": key}),
            ("unknown field", path, {"json": {**good, "colour": "red"}, "headers": key}),
            ("empty body", path, {"content": b"", "headers": {**key, "content-type": "application/json"}}),
            (
                "unsupported media type",
                path,
                {"content": b"hello", "headers": {**key, "content-type": "text/plain"}},
            ),
            (
                "too large",
                path,
                {"content": b"x" * 70_000, "headers": {**key, "content-type": "application/json"}},
            ),
        ]
    cases += [
        ("multipart", "/v1/embed", multipart),
        ("multipart identify", "/v1/identify", {**multipart, "data": {"top_k": "2"}}),
        ("bad base64", "/v1/embed", {"json": {"images": ["not base64!"]}, "headers": key}),
        ("not an image", "/v1/embed", {"json": {"images": [b64(b"hello, world")]}, "headers": key}),
        ("no images", "/v1/embed", {"json": {"images": []}, "headers": key}),
        ("too many images", "/v1/embed", {"json": {"images": [image] * 5}, "headers": key}),
        ("embeddings", "/v1/identify", {"json": {"embeddings": emb, "top_k": 2}, "headers": key}),
        ("wrong dim", "/v1/identify", {"json": {"embeddings": [[1.0, 0.0]]}, "headers": key}),
        ("zero vector", "/v1/identify", {"json": {"embeddings": [[0.0, 0.0, 0.0]]}, "headers": key}),
        ("top_k over the cap", "/v1/identify", {"json": {"embeddings": emb, "top_k": 500}, "headers": key}),
        ("bad sources", "/v1/identify", {"json": {"embeddings": emb, "sources": "all"}, "headers": key}),
        ("both inputs", "/v1/identify", {"json": {"embeddings": emb, "images": [image]}, "headers": key}),
        ("threshold", "/v1/identify", {"json": {"embeddings": emb, "threshold": 0.99}, "headers": key}),
        (
            "embeddings",
            "/v1/verify",
            {"json": {"embedding_a": emb[0], "embedding_b": [1.0, 0, 0]}, "headers": key},
        ),
        ("mixed sides", "/v1/verify", {"json": {"image_a": image, "embedding_b": emb[0]}, "headers": key}),
        ("one side missing", "/v1/verify", {"json": {"image_a": image}, "headers": key}),
        ("bad image side", "/v1/verify", {"json": {"image_a": image, "image_b": b64(b"no")}, "headers": key}),
        (
            "threshold",
            "/v1/verify",
            {"json": {"image_a": image, "image_b": other, "threshold": 1.0}, "headers": key},
        ),
    ]
    return cases


# What may differ between two answers to one request: its own id, and the clock.
_UNCOMPARED = {"x-request-id", "date"}


async def test_hot_routes_answer_every_case_exactly_as_fastapi_routing_does(
    make_settings: Callable[..., Settings], tiny: TinyBundle, tmp_path: Path
) -> None:
    def settings(name: str) -> Settings:
        return make_settings(
            store_url=f"sqlite:///{tmp_path / name}",
            require_key_for_reads=True,
            write_keys=[WRITE_ONLY_KEY],
            max_payload_bytes=64 * 1024,
            max_images_per_request=4,
            max_top_k=50,
        )

    hot_app, plain_app = create_app(settings("hot.db")), create_app(settings("plain.db"), hot_routes=False)
    cases = _cases(b64(tiny.png(0)), b64(tiny.png(7)))
    async with AsyncExitStack() as stack:
        clients = []
        for app in (hot_app, plain_app):
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            clients.append(
                await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url="http://t"))
            )
        statuses: set[int] = set()
        for name, path, kwargs in cases:
            hot, plain = [await c.post(path, **kwargs) for c in clients]
            where = f"{path} {name}"
            assert hot.status_code == plain.status_code, where
            assert hot.content == plain.content, where
            assert {k: v for k, v in hot.headers.items() if k not in _UNCOMPARED} == {
                k: v for k, v in plain.headers.items() if k not in _UNCOMPARED
            }, where
            assert hot.headers["x-request-id"] and plain.headers["x-request-id"], where
            if hot.status_code >= 400:
                assert set(hot.json()["error"]) == {"code", "message", "detail"}, where
            statuses.add(hot.status_code)
    # The cases reach every answer the hot routes document (and no 500).
    assert statuses == {200, 400, 401, 403, 413, 415, 422}


@asynccontextmanager
async def serving_app(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        yield c


async def test_a_hot_route_added_after_the_app_was_built_is_refused_at_start_up(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings())
    guarded = APIRouter(prefix="/v1", dependencies=[Depends(require_read_key)])
    guarded.add_api_route("/identify", embed_routes.embed, methods=["POST"])
    app.include_router(guarded)
    with pytest.raises(RuntimeError, match=r"/v1/identify: .*registered more than once"):
        await app({"type": "http", "method": "POST", "path": "/v1/identify"}, None, None)  # type: ignore[arg-type]


async def test_a_hot_route_with_a_dependency_refuses_to_start(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A maintainer adds a router-level key check to embed: FastAPI would answer 401, a direct call 200.
    guarded = APIRouter(prefix="/v1", dependencies=[Depends(require_read_key)])
    guarded.add_api_route("/embed", embed_routes.embed, methods=["POST"])
    routers = [guarded if r is embed_routes.router else r for r in app_module.ROUTERS]
    monkeypatch.setattr(app_module, "ROUTERS", routers)
    with pytest.raises(
        RuntimeError, match=r"/v1/embed: it has FastAPI dependencies \['require_scope.<locals>.check'\]"
    ):
        create_app(make_settings())
    plain = create_app(make_settings(require_key_for_reads=True), hot_routes=False)  # a plain route
    async with serving_app(plain) as client:
        assert (await client.post("/v1/embed", json={"images": ["aGVsbG8="]})).status_code == 401


async def test_a_hot_route_with_a_body_parameter_refuses_to_start(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def verify(request: Request, body: VerifyRequest) -> Response:  # FastAPI would parse the body
        return Response()

    parsed = APIRouter(prefix="/v1")
    parsed.add_api_route("/verify", verify, methods=["POST"])
    routers = [parsed if r is verify_routes.router else r for r in app_module.ROUTERS]
    monkeypatch.setattr(app_module, "ROUTERS", routers)
    with pytest.raises(RuntimeError, match=r"/v1/verify: it has body parameters \['body'\]"):
        create_app(make_settings())
