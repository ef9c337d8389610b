"""POST /v1/embed (service/api/routes/embed.py), and the body limits every JSON route shares: answers and
every documented error, in-process via httpx.ASGITransport with the tiny real bundle."""

from __future__ import annotations

import asyncio
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from service.app import create_app
from testkit.http_checks import assert_error
from testkit.service_helpers import TinyBundle, b64

pytestmark = pytest.mark.asyncio


async def test_embed_json_matches_reference_embeddings(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    r = await client.post("/v1/embed", json={"images": [b64(tiny.png(i)) for i in range(3)]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == "tiny-digits:1" and body["dim"] == 16
    np.testing.assert_allclose(np.array(body["embeddings"]), tiny.reference([0, 1, 2]), atol=1e-5)


async def test_embed_multipart_equals_embed_json(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    files = [("images", ("a.png", tiny.png(5), "image/png")), ("image", ("b.png", tiny.png(6), "image/png"))]
    multipart = (await client.post("/v1/embed", files=files)).json()
    as_json = (await client.post("/v1/embed", json={"images": [b64(tiny.png(5)), b64(tiny.png(6))]})).json()
    np.testing.assert_allclose(multipart["embeddings"], as_json["embeddings"], atol=1e-6)


async def test_embed_undecodable_image_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embed", json={"images": [b64(b"\x89PNG\r\n\x1a\ntruncated")]})
    assert_error(r, 400, "invalid_image")


async def test_embed_bad_base64_is_400(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/v1/embed", json={"images": ["%%%"]}), 400, "invalid_image")


async def test_embed_empty_batch_is_422(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/v1/embed", json={"images": []}), 422, "validation_error")


async def test_embed_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embed", content=b"hello", headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")


async def test_embed_unsupported_image_format_is_415(client: httpx.AsyncClient) -> None:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="GIF")
    assert_error(await client.post("/v1/embed", json={"images": [b64(buf.getvalue())]}), 415)


async def test_embed_too_many_images_is_413(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    r = await client.post("/v1/embed", json={"images": [b64(tiny.png(0))] * 65})
    assert_error(r, 413, "payload_too_large")


async def test_embed_image_over_pixel_limit_is_413(make_settings, tiny: TinyBundle) -> None:
    app = create_app(make_settings(max_image_pixels=63))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        assert_error(await c.post("/v1/embed", json={"images": [b64(tiny.png(0))]}), 413)


async def test_body_over_payload_limit_is_413(make_settings) -> None:
    app = create_app(make_settings(max_payload_bytes=2048))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        r = await c.post("/v1/embed", json={"images": ["A" * 4000]})
        assert_error(r, 413, "payload_too_large")


async def test_malformed_json_is_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embed", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 422, "validation_error")


async def test_unknown_field_is_422(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    r = await client.post("/v1/embed", json={"images": [b64(tiny.png(0))], "extra": 1})
    assert_error(r, 422)


async def test_requests_beyond_the_queue_limit_get_503_with_retry_after(
    make_settings, tiny: TinyBundle
) -> None:
    # One worker, every batch on its thread: holding that one model call makes later requests queue up.
    app = create_app(
        make_settings(
            max_queue_depth=64, inference_workers=1, inline_inference_max_ms=0.0, lone_inline_max_ms=0.0
        )
    )
    gate = threading.Event()
    png = b64(tiny.png(0))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        engine = app.state.runtime.current.engine
        real_run = engine._run

        def held(batch: np.ndarray) -> np.ndarray:
            gate.wait(10)  # keep the first batch inside the model so later requests queue up
            return real_run(batch)

        engine._run = held
        running = asyncio.create_task(c.post("/v1/embed", json={"images": [png]}))
        await asyncio.sleep(0.1)
        queued = asyncio.create_task(c.post("/v1/embed", json={"images": [png] * 64}))
        await asyncio.sleep(0.1)
        rejected = await c.post("/v1/embed", json={"images": [png]})
        gate.set()
        assert_error(rejected, 503, "overloaded")
        assert int(rejected.headers["retry-after"]) >= 1
        assert (await running).status_code == 200 and (await queued).status_code == 200
