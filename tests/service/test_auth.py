"""Scoped API keys (read / write / admin) on every path, the secure default, and the audit log of writes."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from service.api.auth import KeyRing, key_id
from service.api.hot_routes import HotRoutes
from service.app import create_app, log_access_policy
from service.core.audit import AuditLog, read_audit
from service.core.config import Settings
from testkit.service_helpers import API_KEY, TinyBundle

READ = "read-only-key-0001"
WRITE = "write-only-key-0002"
ADMIN = "admin-only-key-0003"


def scoped_settings(make_settings: Callable[..., Settings], **overrides: object) -> Settings:
    fields: dict[str, object] = {
        "api_keys": [API_KEY],
        "read_keys": [READ],
        "write_keys": [WRITE],
        "admin_keys": [ADMIN],
        "require_key_for_reads": True,  # the default, spelt out (the shared fixture opens reads)
    }
    fields.update(overrides)
    return make_settings(**fields)


@asynccontextmanager
@pytest.mark.asyncio
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        yield c


def key(k: str) -> dict[str, str]:
    return {"X-API-Key": k}


def without_hot_routes(app: FastAPI) -> FastAPI:
    """The same app with every request routed by FastAPI (the middleware stack is built on first call)."""
    app.user_middleware = [m for m in app.user_middleware if m.cls is not HotRoutes]
    return app


def test_reads_need_a_key_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in __import__("os").environ if k.startswith("IDEMBED_")]:
        monkeypatch.delenv(name)
    assert Settings(_env_file=None).require_key_for_reads is True


@pytest.mark.parametrize("hot", [True, False], ids=["hot-dispatch", "fastapi-routing"])
@pytest.mark.asyncio
async def test_every_read_route_checks_the_read_scope_on_both_dispatch_paths(
    make_settings: Callable[..., Settings], tiny: TinyBundle, hot: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(scoped_settings(make_settings))
    if not hot:
        app = without_hot_routes(app)
    routed: list[str] = []
    original = APIRoute.handle

    async def counting(self: APIRoute, scope: dict, receive: object, send: object) -> None:
        routed.append(scope["path"])
        await original(self, scope, receive, send)  # type: ignore[arg-type]

    monkeypatch.setattr(APIRoute, "handle", counting)
    image = base64.b64encode(tiny.png(0)).decode()
    reads = [
        ("POST", "/v1/embed", {"json": {"images": [image]}}),
        ("POST", "/v1/identify", {"json": {"images": [image]}}),
        ("POST", "/v1/verify", {"json": {"image_a": image, "image_b": image}}),
        ("GET", "/v1/identities", {}),
        ("GET", "/v1/model", {}),
    ]
    async with serving(app) as c:
        for method, path, kwargs in reads:
            missing = await c.request(method, path, **kwargs)
            assert missing.status_code == 401, (path, missing.text)
            assert missing.json()["error"]["code"] == "unauthorized"
            assert missing.headers["www-authenticate"] == "ApiKey"
            wrong = await c.request(method, path, headers=key("not-a-key-at-all"), **kwargs)
            assert wrong.status_code == 401, path
            scoped = await c.request(method, path, headers=key(WRITE), **kwargs)
            assert scoped.status_code == 403, (path, scoped.text)
            assert scoped.json()["error"]["detail"]["key_id"] == key_id(WRITE.encode())
            for good in (READ, API_KEY):
                assert (await c.request(method, path, headers=key(good), **kwargs)).status_code == 200, path
        assert ("/v1/embed" in routed) is not hot  # each parametrisation took the path it names
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/readyz")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200


@pytest.mark.asyncio
async def test_reads_can_be_opened_explicitly(
    make_settings: Callable[..., Settings], tiny: TinyBundle
) -> None:
    app = create_app(scoped_settings(make_settings, require_key_for_reads=False))
    image = base64.b64encode(tiny.png(0)).decode()
    async with serving(app) as c:
        assert (await c.post("/v1/embed", json={"images": [image]})).status_code == 200
        assert (await c.get("/v1/identities")).status_code == 200
        # Writes still need the write scope.
        r = await c.post("/v1/identities", json={"name": "x", "embeddings": [[1.0] * 16]})
        assert r.status_code == 401


@pytest.mark.asyncio
async def test_write_and_admin_scopes_are_separate(make_settings: Callable[..., Settings]) -> None:
    app = create_app(scoped_settings(make_settings))
    body = {"name": "ada", "embeddings": [[1.0] * 16]}
    async with serving(app) as c:
        assert (await c.post("/v1/identities", json=body, headers=key(READ))).status_code == 403
        assert (await c.post("/v1/identities", json=body, headers=key(ADMIN))).status_code == 403
        assert (await c.post("/v1/identities", json=body, headers=key(WRITE))).status_code == 201
        assert (await c.delete("/v1/identities/ada", headers=key(READ))).status_code == 403
        assert (await c.delete("/v1/identities/ada", headers=key(WRITE))).status_code == 204
        assert (await c.post("/v1/admin/reload", headers=key(WRITE))).status_code == 403
        assert (await c.post("/v1/admin/reload", headers=key(ADMIN))).status_code == 200
        assert (await c.post("/v1/admin/reload", headers=key(API_KEY))).status_code == 200


@pytest.mark.asyncio
async def test_a_key_listed_in_several_variables_has_all_their_scopes(
    make_settings: Callable[..., Settings],
) -> None:
    both = "console-key-00042"
    app = create_app(
        make_settings(api_keys=[], read_keys=[both], write_keys=[both], require_key_for_reads=True)
    )
    async with serving(app) as c:
        r = await c.post("/v1/identities", json={"name": "b", "embeddings": [[1.0] * 16]}, headers=key(both))
        assert r.status_code == 201
        assert (await c.get("/v1/identities", headers=key(both))).json()["total"] == 1
        r = await c.post("/v1/admin/reload", headers=key(both))
        assert r.status_code == 401 and "IDEMBED_ADMIN_KEYS" in r.json()["error"]["message"]


@pytest.mark.asyncio
async def test_audit_log_records_writes_and_refusals_with_key_ids_only(
    make_settings: Callable[..., Settings], tmp_path
) -> None:
    settings = scoped_settings(make_settings, audit_log_path=tmp_path / "audit" / "audit.jsonl")
    app = create_app(settings)
    vector = [0.123456789 + i for i in range(16)]
    async with serving(app) as c:
        assert (
            await c.post("/v1/identities", json={"name": "ada", "embeddings": [vector]}, headers=key(WRITE))
        ).status_code == 201
        assert (
            await c.post("/v1/identities", json={"name": "ada", "embeddings": [vector]}, headers=key(WRITE))
        ).status_code == 409
        assert (await c.delete("/v1/identities/ada", headers=key(READ))).status_code == 403
        assert (await c.delete("/v1/identities/ada", headers=key("nope-nope-nope"))).status_code == 401
        assert (await c.delete("/v1/identities/ada", headers=key(WRITE))).status_code == 204
        assert (await c.delete("/v1/identities/ada", headers=key(WRITE))).status_code == 404
        assert (await c.post("/v1/admin/reload", headers=key(ADMIN))).status_code == 200
        assert (
            await c.post("/v1/embed", json={"embeddings": [vector]}, headers=key(READ))
        ).status_code != 500
    path = settings.audit_log_path
    assert path is not None and (path.stat().st_mode & 0o777) == 0o600
    entries = list(read_audit(path))
    got = [(e["action"], e["identity"], e["outcome"], e["status"], e["key_id"]) for e in entries]
    w, r, a = (key_id(k.encode()) for k in (WRITE, READ, ADMIN))
    assert got == [
        ("enroll", "ada", "ok", 201, w),
        ("enroll", "ada", "identity_exists", 409, w),
        ("delete", "ada", "denied", 403, r),
        ("delete", "ada", "denied", 401, None),
        ("delete", "ada", "ok", 204, w),
        ("delete", "ada", "identity_not_found", 404, w),
        ("reload", None, "ok", 200, a),
    ]
    assert entries[0]["detail"] == {"replaced": False} and entries[0]["request_id"]
    assert entries[-1]["detail"]["model_id"]
    text = path.read_text()
    for secret in (WRITE, READ, ADMIN, API_KEY, "nope-nope-nope"):
        assert secret not in text
    assert "0.123" not in text and "1.123" not in text  # never a vector value
    assert all(set(json.loads(line)) >= {"ts", "key_id", "action", "identity"} for line in text.splitlines())


def test_start_up_says_when_writes_are_disabled(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture, tmp_path
) -> None:
    settings = make_settings(api_keys=[], require_key_for_reads=True)
    logger = logging.getLogger("idembed.app")
    logger.addHandler(caplog.handler)  # the service's loggers do not propagate to the root once configured
    try:
        with caplog.at_level(logging.INFO, logger="idembed.app"):
            log_access_policy(KeyRing.from_settings(settings), AuditLog(tmp_path / "audit.jsonl"))
    finally:
        logger.removeHandler(caplog.handler)
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "writes are disabled" in messages and "IDEMBED_WRITE_KEYS" in messages
    assert "no API key with the read scope" in messages


@pytest.mark.asyncio
async def test_an_unwritable_audit_log_stops_start_up_naming_the_file(
    make_settings: Callable[..., Settings], tmp_path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the audit folder should be")
    app = create_app(make_settings(audit_log_path=blocker / "audit.jsonl"))
    with pytest.raises(OSError):
        async with app.router.lifespan_context(app):
            pass
    assert "cannot open the audit log" in app.state.runtime.startup_error
    assert str(blocker / "audit.jsonl") in app.state.runtime.startup_error
