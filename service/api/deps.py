"""What routes need from the app: the runtime, settings, and API-key checks.

The dependencies are `async def` although they never await: FastAPI runs plain `def` dependencies in its
thread pool. The hot read routes (embed, identify, verify) do not use FastAPI dependencies at all but call
`read_context`: profiling showed FastAPI's dependency resolution costing more per request than decoding the
image and running a small model together.
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


def read_context(request: Request) -> tuple[ServiceRuntime, Settings]:
    """Runtime and settings for a read route, after the read-key check when reads need a key."""
    settings: Settings = request.app.state.settings
    if settings.require_key_for_reads:
        _check_key(request.headers.get("x-api-key"), settings)
    return request.app.state.runtime, settings


RuntimeDep = Annotated[ServiceRuntime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
