"""Bad-input matrix against a live server: every malformed request gets its documented 4xx, never a 5xx.

Each case is sent over real HTTP (uvicorn, middleware, limits) to one server shared by the session. A case
passes when the status is the expected one, the body is the error envelope `{"error": {code, message}}`,
the status is listed for that route in the OpenAPI schema (that is what "documented" means here), and
/readyz still answers 200 afterwards.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from PIL import Image

from testkit import fault_bundles
from testkit.reliability import LIVE_LIMITS, ServerProcess

DIM = fault_bundles.DIM
MAX_IMAGES = int(LIVE_LIMITS["max_images_per_request"])
MAX_BYTES = int(LIVE_LIMITS["max_payload_bytes"])


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@cache
def good_png() -> bytes:
    return _png(np.random.default_rng(0).integers(0, 256, size=(8, 8), dtype=np.uint8))


@cache
def noisy_png() -> bytes:
    # Noise does not compress, so half of the file really is half of the pixel data.
    return _png(np.random.default_rng(1).integers(0, 256, size=(64, 64), dtype=np.uint8))


@cache
def bomb_png(side: int = 20_000) -> bytes:
    """A real 20000x20000 1-bit PNG: 48 KB on the wire, 400 Mpixels once decoded."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@cache
def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, format="GIF")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def embedding(dim: int = DIM, seed: int = 0) -> list[float]:
    return np.random.default_rng(seed).normal(size=dim).astype(np.float32).tolist()


@dataclass(frozen=True)
class Case:
    """One request and the response it must get. `request` builds httpx.Client.request kwargs lazily."""

    name: str
    method: str
    path: str
    request: Callable[[], dict[str, Any]]
    status: int
    code: str | None = None  # the error envelope's `code`; None for a success case
    headers: dict[str, str] = field(default_factory=dict)


def _json_raw(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": {"Content-Type": "application/json"}}


def _chunked(total: int) -> Iterator[bytes]:
    # A generator body makes httpx send Transfer-Encoding: chunked, with no Content-Length to check up front.
    yield b'{"images": ["'
    piece = b"A" * 65536
    for _ in range(total // len(piece) + 1):
        yield piece
    yield b'"]}'


CASES = [
    # --- images ---
    Case(
        "truncated-png",
        "POST",
        "/v1/embed",
        lambda: {"files": {"images": noisy_png()[:600]}},
        400,
        "invalid_image",
    ),
    Case(
        "corrupt-bytes",
        "POST",
        "/v1/embed",
        lambda: {"files": {"images": bytes(range(256)) * 4}},
        400,
        "invalid_image",
    ),
    Case("zero-byte-image", "POST", "/v1/embed", lambda: {"files": {"images": b""}}, 400, "invalid_image"),
    Case(
        "zero-byte-image-json",
        "POST",
        "/v1/embed",
        lambda: {"json": {"images": [""]}},
        422,
        "validation_error",
    ),
    Case(
        "invalid-base64",
        "POST",
        "/v1/embed",
        lambda: {"json": {"images": ["not base64!"]}},
        400,
        "invalid_image",
    ),
    Case(
        "png-header-only",
        "POST",
        "/v1/embed",
        lambda: {"files": {"images": good_png()[:33]}},
        400,
        "invalid_image",
    ),
    Case(
        "decompression-bomb-20000x20000",
        "POST",
        "/v1/embed",
        lambda: {"files": {"images": bomb_png()}},
        413,
        "payload_too_large",
    ),
    Case(
        "gif-not-supported",
        "POST",
        "/v1/embed",
        lambda: {"json": {"images": [b64(gif())]}},
        415,
        "unsupported_media_type",
    ),
    # --- content types and body framing ---
    Case(
        "text-plain",
        "POST",
        "/v1/embed",
        lambda: {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    Case("no-content-type", "POST", "/v1/embed", lambda: {"content": b"{}"}, 415, "unsupported_media_type"),
    Case(
        "xml",
        "POST",
        "/v1/verify",
        lambda: {"content": b"<a/>", "headers": {"Content-Type": "application/xml"}},
        415,
        "unsupported_media_type",
    ),
    Case(
        "image-part-sent-as-text",
        "POST",
        "/v1/embed",
        lambda: {"data": {"images": "abc"}},
        415,
        "unsupported_media_type",
    ),
    Case(
        "unknown-file-part",
        "POST",
        "/v1/embed",
        lambda: {"files": {"photo": good_png()}},
        415,
        "unsupported_media_type",
    ),
    Case("malformed-json", "POST", "/v1/embed", lambda: _json_raw('{"images": ["'), 422, "validation_error"),
    Case(
        "json-array-not-object",
        "POST",
        "/v1/identify",
        lambda: _json_raw("[1, 2, 3]"),
        422,
        "validation_error",
    ),
    Case(
        "deeply-nested-json",
        "POST",
        "/v1/identify",
        lambda: _json_raw('{"embeddings": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        422,
        "validation_error",
    ),
    Case(
        "huge-json-content-length",
        "POST",
        "/v1/embed",
        lambda: {"json": {"images": ["A" * (MAX_BYTES + 10)]}},
        413,
        "payload_too_large",
    ),
    Case(
        "huge-json-chunked",
        "POST",
        "/v1/embed",
        lambda: {"content": _chunked(MAX_BYTES + 10), "headers": {"Content-Type": "application/json"}},
        413,
        "payload_too_large",
    ),
    Case(
        "unknown-field",
        "POST",
        "/v1/embed",
        lambda: {"json": {"images": [b64(good_png())], "extra": 1}},
        422,
        "validation_error",
    ),
    # --- numbers ---
    Case(
        "nan-embedding",
        "POST",
        "/v1/identify",
        lambda: _json_raw('{"embeddings": [[NaN' + ", 0.1" * (DIM - 1) + "]]}"),
        422,
        "validation_error",
    ),
    Case(
        "infinity-embedding",
        "POST",
        "/v1/identify",
        lambda: _json_raw('{"embeddings": [[Infinity' + ", 0.1" * (DIM - 1) + "]]}"),
        422,
        "validation_error",
    ),
    Case(
        "overflow-to-inf-embedding",
        "POST",
        "/v1/verify",
        lambda: _json_raw(
            '{"embedding_a": [1e999'
            + ", 0.1" * (DIM - 1)
            + '], "embedding_b": '
            + json.dumps(embedding())
            + "}"
        ),
        422,
        "validation_error",
    ),
    Case(
        "all-zero-embedding",
        "POST",
        "/v1/identify",
        lambda: {"json": {"embeddings": [[0.0] * DIM]}},
        422,
        "invalid_input",
    ),
    Case(
        "wrong-dim-embedding",
        "POST",
        "/v1/identify",
        lambda: {"json": {"embeddings": [embedding(DIM + 1)]}},
        422,
        "invalid_input",
    ),
    Case(
        "wrong-dim-verify",
        "POST",
        "/v1/verify",
        lambda: {"json": {"embedding_a": embedding(), "embedding_b": embedding(DIM - 1)}},
        422,
        "invalid_input",
    ),
    Case(
        "threshold-out-of-range",
        "POST",
        "/v1/verify",
        lambda: {"json": {"embedding_a": embedding(), "embedding_b": embedding(), "threshold": 2.0}},
        422,
        "validation_error",
    ),
    Case(
        "top-k-zero",
        "POST",
        "/v1/identify",
        lambda: {"json": {"embeddings": [embedding()], "top_k": 0}},
        422,
        "validation_error",
    ),
    Case(
        "top-k-over-server-limit",
        "POST",
        "/v1/identify",
        lambda: {"json": {"embeddings": [embedding()], "top_k": 21}},
        422,
        "invalid_input",
    ),
    # --- batches ---
    Case("empty-batch", "POST", "/v1/embed", lambda: {"json": {"images": []}}, 422, "validation_error"),
    Case(
        "empty-embeddings",
        "POST",
        "/v1/identify",
        lambda: {"json": {"embeddings": []}},
        422,
        "validation_error",
    ),
    Case(
        "over-limit-batch-json",
        "POST",
        "/v1/embed",
        lambda: {"json": {"images": [b64(good_png())] * (MAX_IMAGES + 1)}},
        413,
        "payload_too_large",
    ),
    Case(
        "over-limit-batch-multipart",
        "POST",
        "/v1/embed",
        lambda: {"files": [("images", good_png())] * (MAX_IMAGES + 1)},
        413,
        "payload_too_large",
    ),
    Case(
        "over-limit-embeddings",
        "POST",
        "/v1/identify",
        lambda: {"json": {"embeddings": [embedding()] * (MAX_IMAGES + 1)}},
        413,
        "payload_too_large",
    ),
    Case(
        "verify-one-side-missing",
        "POST",
        "/v1/verify",
        lambda: {"json": {"image_a": b64(good_png())}},
        422,
        "validation_error",
    ),
    Case(
        "identify-unknown-sources",
        "POST",
        "/v1/identify",
        lambda: {"json": {"embeddings": [embedding()], "sources": "everyone"}},
        422,
        "validation_error",
    ),
    Case(
        "identify-unknown-sources-multipart",
        "POST",
        "/v1/identify",
        lambda: {"files": {"images": good_png()}, "data": {"sources": "centres"}},
        422,
        "validation_error",
    ),
    Case(
        "reload-force-not-a-bool",
        "POST",
        "/v1/admin/reload",
        lambda: {"json": {"force": {"yes": 1}}},
        422,
        "validation_error",
    ),
    Case(
        "identify-images-and-embeddings",
        "POST",
        "/v1/identify",
        lambda: {"json": {"images": [b64(good_png())], "embeddings": [embedding()]}},
        422,
        "validation_error",
    ),
    # --- identity names ---
    Case(
        "name-path-traversal",
        "POST",
        "/v1/identities",
        lambda: {"json": {"name": "../../etc/passwd", "embeddings": [embedding()]}},
        422,
        "validation_error",
    ),
    Case(
        "name-with-slash",
        "POST",
        "/v1/identities",
        lambda: {"json": {"name": "a/b", "embeddings": [embedding()]}},
        422,
        "validation_error",
    ),
    Case(
        "name-dot-dot",
        "POST",
        "/v1/identities",
        lambda: {"json": {"name": "..", "embeddings": [embedding()]}},
        422,
        "validation_error",
    ),
    Case(
        "name-backslash",
        "POST",
        "/v1/identities",
        lambda: {"json": {"name": "C:\\Windows", "embeddings": [embedding()]}},
        422,
        "validation_error",
    ),
    Case(
        "name-nul-byte",
        "POST",
        "/v1/identities",
        lambda: {"json": {"name": "bob\u0000", "embeddings": [embedding()]}},
        422,
        "validation_error",
    ),
    Case(
        "name-bidi-override",
        "POST",
        "/v1/identities",
        lambda: {"json": {"name": "eve\u202egnp.exe", "embeddings": [embedding()]}},
        422,
        "validation_error",
    ),
    Case(
        "name-surrounding-space",
        "POST",
        "/v1/identities",
        lambda: {"json": {"name": " bob ", "embeddings": [embedding()]}},
        422,
        "validation_error",
    ),
    Case(
        "name-empty",
        "POST",
        "/v1/identities",
        lambda: {"json": {"name": "", "embeddings": [embedding()]}},
        422,
        "validation_error",
    ),
    Case(
        "name-too-long",
        "POST",
        "/v1/identities",
        lambda: {"json": {"name": "x" * 129, "embeddings": [embedding()]}},
        422,
        "validation_error",
    ),
    Case("get-encoded-traversal", "GET", "/v1/identities/..%2F..%2Fetc%2Fpasswd", lambda: {}, 404, None),
    Case(
        "delete-unknown",
        "DELETE",
        "/v1/identities/nobody-" + quote("ü"),
        lambda: {},
        404,
        "identity_not_found",
    ),
    # --- authentication ---
    Case(
        "enroll-missing-key",
        "POST",
        "/v1/identities",
        lambda: {"json": {"name": "mallory", "embeddings": [embedding()]}},
        401,
        "unauthorized",
        {"X-API-Key": ""},
    ),
    Case(
        "enroll-wrong-key",
        "POST",
        "/v1/identities",
        lambda: {"json": {"name": "mallory", "embeddings": [embedding()]}},
        401,
        "unauthorized",
        {"X-API-Key": "wrong-key-0123"},
    ),
    Case(
        "delete-wrong-key",
        "DELETE",
        "/v1/identities/ada",
        lambda: {},
        401,
        "unauthorized",
        {"X-API-Key": "x" * 4096},
    ),
    Case(
        "reload-missing-key",
        "POST",
        "/v1/admin/reload",
        lambda: {"json": {}},
        401,
        "unauthorized",
        {"X-API-Key": ""},
    ),
    # --- routing ---
    Case("unknown-route", "GET", "/v1/nope", lambda: {}, 404, "not_found"),
    Case("wrong-method", "GET", "/v1/embed", lambda: {}, 405, "method_not_allowed"),
]


@pytest.fixture(scope="module")
def documented(live_server: ServerProcess) -> dict[tuple[str, str], set[int]]:
    """(METHOD, path template) -> the response statuses the live OpenAPI schema lists for it."""
    schema = httpx.get(f"{live_server.url}/openapi.json", timeout=10).json()
    return {
        (method.upper(), path): {int(s) for s in op["responses"] if s.isdigit()}
        for path, item in schema["paths"].items()
        for method, op in item.items()
    }


def _template(path: str, documented: dict[tuple[str, str], set[int]]) -> str | None:
    if path.startswith("/v1/identities/"):
        return "/v1/identities/{name}"
    return path if any(p == path for _, p in documented) else None


def _request(client: httpx.Client, case: Case) -> httpx.Response:
    kwargs = case.request()
    headers = {**kwargs.pop("headers", {}), **case.headers}
    if headers.get("X-API-Key") == "":
        client.headers.pop("X-API-Key", None)
        headers.pop("X-API-Key")
    return client.request(case.method, case.path, headers=headers, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_documented_client_error_and_server_stays_ready(
    case: Case, client: httpx.Client, live_server: ServerProcess, documented: dict
) -> None:
    response = _request(client, case)

    assert response.status_code == case.status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"}, body
    if case.code is not None:
        assert body["error"]["code"] == case.code, body
    assert body["error"]["message"], "an error must say what is wrong"
    template = _template(case.path, documented)
    if template is not None and case.status not in (404, 405) and (case.method, template) in documented:
        assert case.status in documented[(case.method, template)], (
            f"{case.status} is not documented for {case.method} {template} in the OpenAPI schema"
        )
    if case.status == 401:
        assert "WWW-Authenticate" in response.headers
    assert httpx.get(f"{live_server.url}/readyz", timeout=10).status_code == 200


def test_one_pixel_image_is_embedded(client: httpx.Client) -> None:
    response = client.post("/v1/embed", files={"images": _png(np.full((1, 1), 200, dtype=np.uint8))})

    assert response.status_code == 200, response.text
    vector = np.asarray(response.json()["embeddings"][0])
    assert vector.shape == (DIM,)
    assert np.all(np.isfinite(vector))
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_batch_exactly_at_limit_is_accepted(client: httpx.Client) -> None:
    response = client.post("/v1/embed", json={"images": [b64(good_png())] * MAX_IMAGES})

    assert response.status_code == 200, response.text
    assert len(response.json()["embeddings"]) == MAX_IMAGES


@pytest.mark.parametrize("name", ["Zoë Ñúñez", "张伟", "Ολυμπία", "🙂 smiley", "o'brien & co", "100%-sure?#"])
def test_unicode_and_url_special_names_round_trip(client: httpx.Client, name: str) -> None:
    enrolled = client.post("/v1/identities", json={"name": name, "embeddings": [embedding(seed=len(name))]})
    assert enrolled.status_code == 201, enrolled.text

    fetched = client.get(f"/v1/identities/{quote(name, safe='')}")
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["name"] == name

    again = client.post("/v1/identities", json={"name": name, "embeddings": [embedding()]})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "identity_exists"

    deleted = client.delete(f"/v1/identities/{quote(name, safe='')}")
    assert deleted.status_code == 204
    assert client.get(f"/v1/identities/{quote(name, safe='')}").status_code == 404
