"""What routes need from the app: the runtime, settings, scoped API-key checks and the audit log.

The dependencies are `async def` although they never await: FastAPI runs plain `def` dependencies in its
thread pool. The hot read routes (embed, identify, verify) do not use FastAPI dependencies at all but call
`read_context`: profiling showed FastAPI's dependency resolution costing more per request than decoding the
image and running a small model together. Both paths end in the same `KeyRing.authorize`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from service.api.auth import KeyRing, Scope
from service.api.errors import status_of
from service.core.audit import AuditLog
from service.core.config import Settings
from service.core.logging import request_id_var
from service.errors import AuthenticationError, ForbiddenError, ServiceError
from service.offload import in_thread
from service.runtime import ServiceRuntime

api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="a key from IDEMBED_API_KEYS (every scope) or IDEMBED_READ_KEYS / IDEMBED_WRITE_KEYS / "
    "IDEMBED_ADMIN_KEYS",
)

# The audit log's action for each write/admin endpoint (FastAPI's route name is the function name).
ACTIONS = {
    "enroll": "enroll",
    "delete_identity": "delete",
    "reload_bundle": "reload",
    "write_snapshot": "snapshot",
}


async def get_runtime(request: Request) -> ServiceRuntime:
    return request.app.state.runtime


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def authorize(request: Request, scope: Scope) -> str | None:
    """The key id allowed to do `scope` for this request (None: an open read); 401/403 otherwise."""
    keyring: KeyRing = request.app.state.keyring
    key = keyring.authorize(request.headers.get("x-api-key"), scope)
    request.state.key_id = key
    return key


async def audit(
    request: Request,
    action: str,
    identity: str | None,
    outcome: str,
    status: int,
    detail: dict[str, Any] | None = None,
) -> None:
    log: AuditLog = request.app.state.audit
    key_id = getattr(request.state, "key_id", None)
    await in_thread(
        log.record,
        action,
        key_id=key_id,
        identity=identity,
        outcome=outcome,
        status=status,
        request_id=request_id_var.get(),
        detail=detail,
    )


@asynccontextmanager
async def audited(
    request: Request, action: str, identity: str | None, status: int
) -> AsyncIterator[dict[str, Any]]:
    """Audit the write in the block: `ok` with `status`, or the error's code and status if it raises.

    The block may fill the yielded dict with detail for the entry (e.g. the bundle a reload loaded)."""
    detail: dict[str, Any] = {}
    try:
        yield detail
    except ServiceError as exc:
        await audit(request, action, identity, exc.code, status_of(exc), detail or None)
        raise
    await audit(request, action, identity, "ok", status, detail or None)


def require_scope(scope: Scope) -> Callable[..., Awaitable[None]]:
    """A route dependency; write and admin refusals are audited (reads are not: they change nothing)."""

    async def check(request: Request, _: Annotated[str | None, Depends(api_key_header)]) -> None:
        try:
            authorize(request, scope)
        except (AuthenticationError, ForbiddenError) as exc:
            if scope != "read":
                route = request.scope.get("route")
                action = ACTIONS.get(getattr(route, "name", ""), request.url.path)
                status = 403 if isinstance(exc, ForbiddenError) else 401
                key = exc.detail.get("key_id") if isinstance(exc.detail, dict) else None
                request.state.key_id = key
                await audit(request, action, request.path_params.get("name"), "denied", status)
            raise

    return check


require_read_key = require_scope("read")
require_write_key = require_scope("write")
require_admin_key = require_scope("admin")


def read_context(request: Request) -> tuple[ServiceRuntime, Settings]:
    """Runtime and settings for a hot read route, after the same read-scope check as every other route."""
    authorize(request, "read")
    return request.app.state.runtime, request.app.state.settings


RuntimeDep = Annotated[ServiceRuntime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
