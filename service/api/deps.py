"""Injected dependencies of the routes: the runtime, settings, and API-key checks.

They are `async def` although they never await: FastAPI runs plain `def` dependencies in its thread pool,
and that hop per dependency cost more than the whole embed computation for small models (profiled).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from service.core.config import Settings
from service.errors import AuthenticationError
from service.runtime import ServiceRuntime

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="one of the keys in IDEMBED_API_KEYS"
)


async def get_runtime(request: Request) -> ServiceRuntime:
    return request.app.state.runtime


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def key_matches(given: str, keys: list[bytes]) -> bool:
    """Constant-time check against every configured key (no early exit), so timing reveals nothing."""
    candidate = given.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched


def _check_key(given: str | None, settings: Settings) -> None:
    keys = settings.api_key_values()
    if not keys:
        raise AuthenticationError(
            "this server has no API keys configured (IDEMBED_API_KEYS); writes are disabled"
        )
    if not given:
        raise AuthenticationError("missing X-API-Key header")
    if not key_matches(given, keys):
        raise AuthenticationError("wrong API key")


async def require_write_key(
    settings: Annotated[Settings, Depends(get_settings)],
    api_key: Annotated[str | None, Depends(api_key_header)],
) -> None:
    _check_key(api_key, settings)


async def require_read_key(
    settings: Annotated[Settings, Depends(get_settings)],
    api_key: Annotated[str | None, Depends(api_key_header)],
) -> None:
    if settings.require_key_for_reads:
        _check_key(api_key, settings)


RuntimeDep = Annotated[ServiceRuntime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
