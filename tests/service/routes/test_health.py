"""Probes and metrics (service/api/routes/health.py): /healthz, /readyz, /metrics."""

from __future__ import annotations

import httpx
import pytest

from service.app import create_app
from testkit.http_checks import assert_error
from testkit.service_helpers import TinyBundle, b64

pytestmark = pytest.mark.asyncio


async def test_probes(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json()["status"] == "ok"
    ready = (await client.get("/readyz")).json()
    assert ready == {"status": "ready", "model_id": "tiny-digits:1"}


async def test_readyz_is_503_before_the_model_is_loaded(make_settings) -> None:
    app = create_app(make_settings())  # lifespan not run: nothing loaded
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/readyz")
        assert_error(r, 503, "not_ready")
        assert r.headers["retry-after"] == "1"
        assert_error(await c.post("/v1/embed", json={"images": ["AAAA"]}), 503)
        assert (await c.get("/healthz")).status_code == 200


async def test_metrics_expose_requests_batches_queue_and_gallery(
    client: httpx.AsyncClient, tiny: TinyBundle
) -> None:
    await client.post("/v1/embed", json={"images": [b64(tiny.png(0))]})
    text = (await client.get("/metrics")).text
    assert 'idembed_requests_total{method="POST",route="/v1/embed",status="200"} 1.0' in text
    assert "idembed_request_duration_seconds_bucket" in text and "idembed_batch_size_count 1.0" in text
    assert "idembed_queue_depth 0.0" in text and 'idembed_gallery_size{source="center"} 8.0' in text
    assert 'idembed_model_info{model_id="tiny-digits:1"} 1.0' in text
