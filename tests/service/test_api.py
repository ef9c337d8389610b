"""Every v1 endpoint and documented error, in-process via httpx.ASGITransport with the tiny real bundle."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from PIL import Image
from service_testkit import API_KEY, TinyBundle

from service.app import create_app

pytestmark = pytest.mark.asyncio
AUTH = {"X-API-Key": API_KEY}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


# --- embed -------------------------------------------------------------------------------------------------


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


# --- identify / verify -------------------------------------------------------------------------------------


async def test_identify_image_finds_its_digit_center(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    idx = tiny.of_digit(3, 1)[0]
    body = {"images": [b64(tiny.png(idx))], "top_k": 3, "sources": "centers"}
    r = await client.post("/v1/identify", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["sources"] == "centers"
    result = r.json()["results"][0]
    assert len(result["matches"]) == 3 and result["matches"][0]["source"] == "center"
    sims = [m["similarity"] for m in result["matches"]]
    assert sims == sorted(sims, reverse=True)
    assert result["identity"] == result["matches"][0]["identity"] == "3"
    assert r.json()["threshold"] == 0.8


async def test_identify_below_threshold_is_unknown(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    body = {"images": [b64(tiny.png(0))], "threshold": 0.9999, "sources": "both"}
    r = await client.post("/v1/identify", json=body)
    result = r.json()["results"][0]
    assert result["identity"] is None and result["unknown"] is True and result["matches"]


async def test_identify_by_embedding_equals_identify_by_image(
    client: httpx.AsyncClient, tiny: TinyBundle
) -> None:
    query = {"images": [b64(tiny.png(7))], "sources": "both"}
    by_image = (await client.post("/v1/identify", json=query)).json()
    emb = tiny.reference([7])[0].tolist()
    by_emb = (await client.post("/v1/identify", json={"embeddings": [emb], "sources": "both"})).json()
    assert [m["identity"] for m in by_emb["results"][0]["matches"]] == [
        m["identity"] for m in by_image["results"][0]["matches"]
    ]


@pytest.mark.parametrize("top_k", [0, 101, -3])
async def test_identify_top_k_out_of_range_is_422(
    client: httpx.AsyncClient, tiny: TinyBundle, top_k: int
) -> None:
    r = await client.post("/v1/identify", json={"images": [b64(tiny.png(0))], "top_k": top_k})
    assert_error(r, 422)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
async def test_identify_nan_or_inf_embedding_is_422(client: httpx.AsyncClient, bad: str) -> None:
    body = '{"embeddings": [[' + ", ".join(["0.1"] * 15 + [bad]) + "]]}"
    r = await client.post("/v1/identify", content=body, headers={"content-type": "application/json"})
    assert_error(r, 422)


async def test_identify_float32_overflow_is_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/identify", json={"embeddings": [[1e300] + [0.0] * 15]})
    assert_error(r, 422, "invalid_input")


async def test_identify_wrong_dimension_is_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/identify", json={"embeddings": [[0.1, 0.2, 0.3]]})
    assert "16" in assert_error(r, 422, "invalid_input")["message"]


async def test_identify_needs_exactly_one_input_kind(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    assert_error(await client.post("/v1/identify", json={"top_k": 1}), 422)
    both = {"images": [b64(tiny.png(0))], "embeddings": [[0.1] * 16]}
    assert_error(await client.post("/v1/identify", json=both), 422)


async def test_identify_multipart_with_form_fields(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    files = [("images", ("q.png", tiny.png(1), "image/png"))]
    data = {"top_k": "2", "threshold": "0.1", "sources": "centers"}
    r = await client.post("/v1/identify", files=files, data=data)
    assert r.status_code == 200, r.text
    assert len(r.json()["results"][0]["matches"]) == 2 and r.json()["threshold"] == 0.1
    assert r.json()["sources"] == "centers"


async def test_verify_same_digit_images_against_embedding_similarity(
    client: httpx.AsyncClient, tiny: TinyBundle
) -> None:
    a, b = tiny.of_digit(4, 2)
    r = await client.post("/v1/verify", json={"image_a": b64(tiny.png(a)), "image_b": b64(tiny.png(b))})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = tiny.reference([a, b])
    assert body["similarity"] == pytest.approx(float(ref[0] @ ref[1]), abs=1e-5)
    assert body["same"] == (body["similarity"] >= body["threshold"])


async def test_verify_mixed_image_and_embedding_and_multipart(
    client: httpx.AsyncClient, tiny: TinyBundle
) -> None:
    emb = tiny.reference([9])[0].tolist()
    r = await client.post(
        "/v1/verify", json={"image_a": b64(tiny.png(9)), "embedding_b": emb, "threshold": 0.99}
    )
    assert r.json()["similarity"] == pytest.approx(1.0, abs=1e-5) and r.json()["same"] is True
    files = [
        ("image_a", ("a.png", tiny.png(9), "image/png")),
        ("image_b", ("b.png", tiny.png(9), "image/png")),
    ]
    assert (await client.post("/v1/verify", files=files)).json()["similarity"] == pytest.approx(1.0, abs=1e-5)


async def test_verify_missing_side_is_422(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    assert_error(await client.post("/v1/verify", json={"image_a": b64(tiny.png(0))}), 422)


async def test_verify_zero_embedding_is_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/verify", json={"embedding_a": [0.0] * 16, "embedding_b": [1.0] * 16})
    assert_error(r, 422, "invalid_input")


# --- identities --------------------------------------------------------------------------------------------


async def test_enroll_then_identify_returns_the_enrolled_identity(
    client: httpx.AsyncClient, tiny: TinyBundle
) -> None:
    nines = tiny.of_digit(9, 4)
    body = {"name": "nine", "images": [b64(tiny.png(i)) for i in nines[:3]], "metadata": {"who": "test"}}
    r = await client.post("/v1/identities", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    assert (
        r.json()["image_count"] == 3
        and r.json()["replaced"] is False
        and r.json()["metadata"] == {"who": "test"}
    )
    probe = (
        await client.post("/v1/identify", json={"images": [b64(tiny.png(nines[3]))], "top_k": 10})
    ).json()
    matches = probe["results"][0]["matches"]
    assert {"identity": "nine", "source": "enrolled"} in [
        {"identity": m["identity"], "source": m["source"]} for m in matches
    ]


async def test_enroll_multipart_with_metadata_json(client: httpx.AsyncClient, tiny: TinyBundle) -> None:
    files = [("images", ("a.png", tiny.png(1), "image/png")), ("images", ("b.png", tiny.png(2), "image/png"))]
    data = {"name": "pair", "metadata": json.dumps({"k": 1}), "replace": "false"}
    r = await client.post("/v1/identities", files=files, data=data, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["image_count"] == 2 and r.json()["metadata"] == {"k": 1}


async def test_enroll_duplicate_is_409_unless_replace(client: httpx.AsyncClient) -> None:
    emb = [[1.0] + [0.0] * 15]
    assert (
        await client.post("/v1/identities", json={"name": "dup", "embeddings": emb}, headers=AUTH)
    ).status_code == 201
    assert_error(
        await client.post("/v1/identities", json={"name": "dup", "embeddings": emb}, headers=AUTH), 409
    )
    again = await client.post(
        "/v1/identities", json={"name": "dup", "embeddings": emb, "replace": True}, headers=AUTH
    )
    assert again.status_code == 201 and again.json()["replaced"] is True


async def test_writes_without_or_with_wrong_key_are_401(client: httpx.AsyncClient) -> None:
    body = {"name": "x", "embeddings": [[1.0] * 16]}
    assert_error(await client.post("/v1/identities", json=body), 401, "unauthorized")
    assert_error(await client.post("/v1/identities", json=body, headers={"X-API-Key": "wrong-key-000"}), 401)
    assert_error(await client.delete("/v1/identities/x"), 401)
    assert_error(await client.post("/v1/admin/reload"), 401)


async def test_writes_are_refused_when_no_keys_are_configured(make_settings) -> None:
    app = create_app(make_settings(api_keys=[]))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        r = await c.post("/v1/identities", json={"name": "x", "embeddings": [[1.0] * 16]}, headers=AUTH)
        assert "IDEMBED_API_KEYS" in assert_error(r, 401)["message"]


async def test_reads_can_require_a_key(make_settings, tiny: TinyBundle) -> None:
    app = create_app(make_settings(require_key_for_reads=True))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        assert_error(await c.post("/v1/embed", json={"images": [b64(tiny.png(0))]}), 401)
        assert (
            await c.post("/v1/embed", json={"images": [b64(tiny.png(0))]}, headers=AUTH)
        ).status_code == 200
        assert (await c.get("/healthz")).status_code == 200


@pytest.mark.parametrize("name", ["a/b", "..", " padded", "tab\there", ""])
async def test_bad_identity_names_are_422(client: httpx.AsyncClient, name: str) -> None:
    r = await client.post("/v1/identities", json={"name": name, "embeddings": [[1.0] * 16]}, headers=AUTH)
    assert_error(r, 422)


async def test_unicode_name_round_trips_through_the_path(client: httpx.AsyncClient) -> None:
    name = "Zoë 王 ✓"
    r = await client.post("/v1/identities", json={"name": name, "embeddings": [[1.0] * 16]}, headers=AUTH)
    assert r.status_code == 201, r.text
    got = await client.get(f"/v1/identities/{quote(name, safe='')}")
    assert got.status_code == 200 and got.json()["name"] == name
    assert (await client.delete(f"/v1/identities/{quote(name, safe='')}", headers=AUTH)).status_code == 204


async def test_list_pages_and_get_and_delete(client: httpx.AsyncClient) -> None:
    for i in range(5):
        emb = [[float(i + 1)] + [1.0] * 15]
        assert (
            await client.post("/v1/identities", json={"name": f"p{i}", "embeddings": emb}, headers=AUTH)
        ).is_success
    page = (await client.get("/v1/identities", params={"offset": 1, "limit": 2})).json()
    assert page["total"] == 5 and [i["name"] for i in page["items"]] == ["p1", "p2"]
    assert (await client.get("/v1/identities/p3")).json()["image_count"] == 1
    assert (await client.delete("/v1/identities/p3", headers=AUTH)).status_code == 204
    assert_error(await client.get("/v1/identities/p3"), 404, "identity_not_found")
    assert_error(await client.delete("/v1/identities/p3", headers=AUTH), 404)
    assert_error(await client.get("/v1/identities", params={"limit": 0}), 422)


# --- model, probes, metrics, operability -------------------------------------------------------------------


async def test_model_endpoint_returns_manifest_and_gallery(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/model")).json()
    assert body["model_id"] == "tiny-digits:1"
    assert body["manifest"]["embedding"]["dim"] == 16
    assert body["gallery"] == {"centers": 8, "enrolled": 0, "orphaned": 0}


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


async def test_request_id_is_echoed_or_generated(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = (await client.get("/healthz", headers={"X-Request-ID": "bad id\nwith newline"})).headers
    assert generated["x-request-id"] and "\n" not in generated["x-request-id"]
    again = (await client.get("/healthz")).headers["x-request-id"]
    assert again != generated["x-request-id"]


async def test_unknown_route_uses_the_error_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nope"), 404, "not_found")


async def test_openapi_documents_both_encodings_and_examples(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    content = spec["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert content["application/json"]["schema"]["examples"]
    assert "examples" in spec["components"]["schemas"]["IdentifyResponse"]
    assert "422" in spec["paths"]["/v1/identify"]["post"]["responses"]


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


async def test_reload_with_malformed_or_foreign_body_is_a_client_error(client: httpx.AsyncClient) -> None:
    bad_json = await client.post(
        "/v1/admin/reload", content=b"\xff{", headers={**AUTH, "content-type": "application/json"}
    )
    assert_error(bad_json, 422, "validation_error")
    text = await client.post(
        "/v1/admin/reload", content=b"default", headers={**AUTH, "content-type": "text/plain"}
    )
    assert_error(text, 415)
