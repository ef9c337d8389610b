"""Checks the route tests share: the test key's header and the error envelope every 4xx/5xx must have."""

from __future__ import annotations

import httpx

from testkit.service_helpers import API_KEY

AUTH = {"X-API-Key": API_KEY}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]
