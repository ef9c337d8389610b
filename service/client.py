"""Typed client of the v1 API (sync and async, httpx) returning the same pydantic models the server uses.

from service.client import IdembedClient
with IdembedClient("http://127.0.0.1:8000", api_key="...") as c:
    c.enroll("alice", images=[Path("alice1.png"), Path("alice2.png")])
    print(c.identify(images=[Path("probe.png")]).results[0].identity)
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from service.api.schemas import (
    EmbedResponse,
    EnrollResponse,
    Health,
    IdentifyResponse,
    Identity,
    IdentityPage,
    ModelInfo,
    ReloadResponse,
    SearchSources,
    SnapshotResponse,
    VerifyResponse,
)

ImageInput = bytes | Path
Vector = Sequence[float]
R = TypeVar("R", bound=BaseModel)


class IdembedError(Exception):
    """An error response: HTTP status plus the service's error code, message and detail."""

    def __init__(
        self, status: int, code: str, message: str, detail: Any = None, request_id: str | None = None
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.request_id = request_id
        super().__init__(f"{status} {code}: {message}")


def _b64(image: ImageInput) -> str:
    data = image.read_bytes() if isinstance(image, Path) else image
    return base64.b64encode(data).decode("ascii")


def _images(images: Sequence[ImageInput] | None) -> list[str] | None:
    return None if images is None else [_b64(i) for i in images]


def _side(value: ImageInput | Vector, side: str) -> dict[str, Any]:
    if isinstance(value, bytes | Path):
        return {f"image_{side}": _b64(value)}
    return {f"embedding_{side}": [float(x) for x in value]}


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        err = response.json()["error"]
        code, message, detail = err["code"], err["message"], err.get("detail")
    except (ValueError, KeyError, TypeError):
        code, message, detail = f"http_{response.status_code}", response.text[:500], None
    raise IdembedError(response.status_code, code, message, detail, response.headers.get("x-request-id"))


class _Requests:
    """Method, path and JSON body of each call; shared by the sync and async clients."""

    @staticmethod
    def embed(images: Sequence[ImageInput]) -> tuple[str, str, dict[str, Any]]:
        return "POST", "/v1/embed", {"images": _images(images)}

    @staticmethod
    def identify(
        images: Sequence[ImageInput] | None,
        embeddings: Sequence[Vector] | None,
        top_k: int,
        threshold: float | None,
        sources: SearchSources | None,
    ) -> tuple[str, str, dict[str, Any]]:
        emb = None if embeddings is None else [[float(x) for x in e] for e in embeddings]
        body = {
            "images": _images(images),
            "embeddings": emb,
            "top_k": top_k,
            "threshold": threshold,
            "sources": sources,
        }
        return "POST", "/v1/identify", _drop_none(body)

    @staticmethod
    def verify(
        a: ImageInput | Vector, b: ImageInput | Vector, threshold: float | None
    ) -> tuple[str, str, dict[str, Any]]:
        return "POST", "/v1/verify", _drop_none({**_side(a, "a"), **_side(b, "b"), "threshold": threshold})

    @staticmethod
    def enroll(
        name: str,
        images: Sequence[ImageInput] | None,
        embeddings: Sequence[Vector] | None,
        metadata: dict[str, Any] | None,
        replace: bool,
    ) -> tuple[str, str, dict[str, Any]]:
        emb = None if embeddings is None else [[float(x) for x in e] for e in embeddings]
        body = {
            "name": name,
            "images": _images(images),
            "embeddings": emb,
            "metadata": metadata,
            "replace": replace,
        }
        return "POST", "/v1/identities", _drop_none(body)

    @staticmethod
    def reload(bundle: str | None, force: bool) -> tuple[str, str, dict[str, Any]]:
        return "POST", "/v1/admin/reload", _drop_none({"bundle": bundle, "force": force or None})


class IdembedClient:
    """Blocking client; `api_key` is sent as X-API-Key on every call."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> IdembedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, model: type[R], method: str, path: str, body: dict[str, Any] | None = None) -> R:
        response = _check(self._http.request(method, path, json=body))
        return model.model_validate_json(response.content)

    def embed(self, images: Sequence[ImageInput]) -> EmbedResponse:
        return self._call(EmbedResponse, *_Requests.embed(images))

    def identify(
        self,
        images: Sequence[ImageInput] | None = None,
        embeddings: Sequence[Vector] | None = None,
        *,
        top_k: int = 5,
        threshold: float | None = None,
        sources: SearchSources | None = None,
    ) -> IdentifyResponse:
        """`sources`: enrolled, centers or both (default: the server's IDEMBED_IDENTIFY_SOURCES)."""
        return self._call(
            IdentifyResponse, *_Requests.identify(images, embeddings, top_k, threshold, sources)
        )

    def verify(
        self, a: ImageInput | Vector, b: ImageInput | Vector, *, threshold: float | None = None
    ) -> VerifyResponse:
        return self._call(VerifyResponse, *_Requests.verify(a, b, threshold))

    def enroll(
        self,
        name: str,
        images: Sequence[ImageInput] | None = None,
        embeddings: Sequence[Vector] | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> EnrollResponse:
        return self._call(EnrollResponse, *_Requests.enroll(name, images, embeddings, metadata, replace))

    def list_identities(self, *, offset: int = 0, limit: int = 100) -> IdentityPage:
        return self._call(IdentityPage, "GET", f"/v1/identities?offset={offset}&limit={limit}")

    def get_identity(self, name: str) -> Identity:
        return self._call(Identity, "GET", f"/v1/identities/{quote(name, safe='')}")

    def delete_identity(self, name: str) -> None:
        _check(self._http.delete(f"/v1/identities/{quote(name, safe='')}"))

    def model(self) -> ModelInfo:
        return self._call(ModelInfo, "GET", "/v1/model")

    def reload(self, bundle: str | None = None, *, force: bool = False) -> ReloadResponse:
        """Hot-swap the bundle; another model that would orphan enrolled identities needs `force=True`."""
        return self._call(ReloadResponse, *_Requests.reload(bundle, force))

    def snapshot(self) -> SnapshotResponse:
        """Save the gallery index snapshot now (needs IDEMBED_GALLERY_SNAPSHOT_PATH, an hnsw/auto index)."""
        return self._call(SnapshotResponse, "POST", "/v1/admin/snapshot")

    def healthz(self) -> Health:
        return self._call(Health, "GET", "/healthz")

    def readyz(self) -> Health:
        return self._call(Health, "GET", "/readyz")

    def metrics(self) -> str:
        return _check(self._http.get("/metrics")).text


class AsyncIdembedClient:
    """The same calls as `IdembedClient`, awaitable (for concurrent load and tests)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: httpx.Limits | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=timeout,
            transport=transport,
            limits=limits or httpx.Limits(max_connections=256, max_keepalive_connections=256),
        )

    async def __aenter__(self) -> AsyncIdembedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, model: type[R], method: str, path: str, body: dict[str, Any] | None = None) -> R:
        response = _check(await self._http.request(method, path, json=body))
        return model.model_validate_json(response.content)

    async def embed(self, images: Sequence[ImageInput]) -> EmbedResponse:
        return await self._call(EmbedResponse, *_Requests.embed(images))

    async def identify(
        self,
        images: Sequence[ImageInput] | None = None,
        embeddings: Sequence[Vector] | None = None,
        *,
        top_k: int = 5,
        threshold: float | None = None,
        sources: SearchSources | None = None,
    ) -> IdentifyResponse:
        return await self._call(
            IdentifyResponse, *_Requests.identify(images, embeddings, top_k, threshold, sources)
        )

    async def verify(
        self, a: ImageInput | Vector, b: ImageInput | Vector, *, threshold: float | None = None
    ) -> VerifyResponse:
        return await self._call(VerifyResponse, *_Requests.verify(a, b, threshold))

    async def enroll(
        self,
        name: str,
        images: Sequence[ImageInput] | None = None,
        embeddings: Sequence[Vector] | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> EnrollResponse:
        return await self._call(
            EnrollResponse, *_Requests.enroll(name, images, embeddings, metadata, replace)
        )

    async def list_identities(self, *, offset: int = 0, limit: int = 100) -> IdentityPage:
        return await self._call(IdentityPage, "GET", f"/v1/identities?offset={offset}&limit={limit}")

    async def get_identity(self, name: str) -> Identity:
        return await self._call(Identity, "GET", f"/v1/identities/{quote(name, safe='')}")

    async def delete_identity(self, name: str) -> None:
        _check(await self._http.delete(f"/v1/identities/{quote(name, safe='')}"))

    async def model(self) -> ModelInfo:
        return await self._call(ModelInfo, "GET", "/v1/model")

    async def reload(self, bundle: str | None = None, *, force: bool = False) -> ReloadResponse:
        return await self._call(ReloadResponse, *_Requests.reload(bundle, force))

    async def snapshot(self) -> SnapshotResponse:
        return await self._call(SnapshotResponse, "POST", "/v1/admin/snapshot")

    async def readyz(self) -> Health:
        return await self._call(Health, "GET", "/readyz")
