"""POST /v1/verify (service/api/routes/verify.py): images, embeddings or both, and its documented errors."""

from __future__ import annotations

import httpx
import pytest

from testkit.http_checks import assert_error
from testkit.service_helpers import TinyBundle, b64

pytestmark = pytest.mark.asyncio


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
