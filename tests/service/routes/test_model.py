"""GET /v1/model (service/api/routes/model.py): the served manifest and gallery sizes."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.asyncio


async def test_model_endpoint_returns_manifest_and_gallery(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/model")).json()
    assert body["model_id"] == "tiny-digits:1"
    assert body["manifest"]["embedding"]["dim"] == 16
    assert body["gallery"] == {"centers": 8, "enrolled": 0, "orphaned": 0}
