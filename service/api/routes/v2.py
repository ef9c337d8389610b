"""Open Inference Protocol (KServe v2) over HTTP, beside the v1 API, on the same batching engine.

Health, server and model metadata, model readiness and `infer` as the protocol defines them, so Triton's and
KServe's clients (e.g. `tritonclient.http`) work unchanged. The served model is named as in its manifest
(`idembed-digits`, version `1`). It takes either input, not both:

* `images` (BYTES, shape `[N]`): encoded image files (PNG, JPEG, ...), preprocessed by the bundle's own
  recipe exactly as `/v1/embed` does; in JSON each element is base64 text, in the binary extension raw bytes;
* `input` (FP32, the ONNX input `[N, H, W, C]`): tensors already preprocessed by the caller;

and returns `embedding` (FP32 `[N, D]`, L2-normalised). Both the JSON body and Triton's binary tensor
extension (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data` outputs) are understood.
Errors are the protocol's `{"error": "<message>"}` with the status of the matching v1 error. `infer` and
the metadata routes need a key with the read scope, like /v1/embed; the health routes are open, like /readyz.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service import errors as e
from service.api.bodies import check_count
from service.api.deps import authorize
from service.api.errors import status_of
from service.model_slot import LoadedModel
from service.runtime import ServiceRuntime

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

HEADER_LENGTH = "inference-header-content-length"
IMAGES, TENSOR, OUTPUT = "images", "input", "embedding"
_ERROR_DOC = {"content": {"application/json": {"schema": {"type": "object", "properties": {"error": {}}}}}}


class ProtocolError(e.InvalidInputError):
    """A request the protocol rules out (unknown tensor, wrong datatype, shape and data disagree): 400."""

    code = "bad_request"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _protocol(call: Callable[[], Awaitable[Response]]) -> Response:
    """Run a v2 handler; service errors become the protocol's error body."""
    try:
        return await call()
    except ProtocolError as exc:
        return _error(400, exc.message)
    except e.ServiceError as exc:
        headers = None
        if isinstance(exc, e.OverloadedError):
            headers = {"Retry-After": str(exc.retry_after_s)}
        elif isinstance(exc, e.AuthenticationError):
            headers = {"WWW-Authenticate": "ApiKey"}
        return _error(status_of(exc), exc.message, headers)


def _runtime(request: Request) -> ServiceRuntime:
    return request.app.state.runtime


def _model(request: Request, name: str, version: str | None) -> LoadedModel:
    """The served model if `name` (and `version`, when given) are its manifest's; 404 otherwise."""
    loaded = _runtime(request).current
    manifest = loaded.model.manifest
    if name != manifest.name or (version is not None and version != manifest.version):
        asked = name if version is None else f"{name} version {version}"
        raise e.IdentityNotFoundError(
            f"no model {asked!r} is served here; this server serves {manifest.name!r} version "
            f"{manifest.version!r}"
        )
    return loaded


@router.get("/health/live", summary="Liveness (v2)", responses={200: {"description": "the process answers"}})
async def live() -> Response:
    return JSONResponse({"live": True})


@router.get(
    "/health/ready",
    summary="Readiness (v2)",
    responses={200: {"description": "a verified, warm model is serving"}, 503: _ERROR_DOC},
)
async def ready(request: Request) -> Response:
    reason = _runtime(request).readiness()
    if reason is not None:
        return _error(503, reason)
    return JSONResponse({"ready": True})


@router.get("", summary="Server metadata (v2)", responses={401: _ERROR_DOC, 403: _ERROR_DOC})
async def server_metadata(request: Request) -> Response:
    async def call() -> Response:
        authorize(request, "read")
        return JSONResponse(
            {"name": "idembed", "version": request.app.version, "extensions": ["binary_tensor_data"]}
        )

    return await _protocol(call)


def _metadata(loaded: LoadedModel) -> dict[str, Any]:
    m = loaded.model.manifest
    return {
        "name": m.name,
        "versions": [m.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": IMAGES, "datatype": "BYTES", "shape": [-1]},
            # inputgraph: a model that normalises its own uint8 pixels (input.dtype uint8) takes images only
            *(
                []
                if m.input.takes_pixels
                else [{"name": TENSOR, "datatype": "FP32", "shape": [-1, *m.input.shape(None)[1:]]}]
            ),
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, m.embedding.dim]}],
        "parameters": {"model_id": loaded.model_id, "layout": m.input.layout, "metric": "cosine"},
    }


_MODEL_DOCS = {401: _ERROR_DOC, 403: _ERROR_DOC, 404: _ERROR_DOC, 503: _ERROR_DOC}


@router.get("/models/{name}", summary="Model metadata (v2)", responses=_MODEL_DOCS)
@router.get("/models/{name}/versions/{version}", summary="Model metadata (v2)", responses=_MODEL_DOCS)
async def model_metadata(request: Request, name: str, version: str | None = None) -> Response:
    async def call() -> Response:
        authorize(request, "read")
        return JSONResponse(_metadata(_model(request, name, version)))

    return await _protocol(call)


@router.get("/models/{name}/ready", summary="Model readiness (v2)", responses=_MODEL_DOCS)
@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness (v2)", responses=_MODEL_DOCS)
async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    async def call() -> Response:
        authorize(request, "read")
        _model(request, name, version)
        if not _runtime(request).ready:
            raise e.NotReadyError("the service is shutting down")
        return JSONResponse({"name": name, "ready": True})

    return await _protocol(call)


_INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {"type": "array", "items": {"type": "object"}},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                        "parameters": {"type": "object"},
                    },
                }
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor extension: JSON header (Inference-Header-Content-Length bytes) "
                "followed by the tensors' raw bytes",
            },
        },
    }
}
_INFER_RESPONSES = {400: _ERROR_DOC, 413: _ERROR_DOC, **_MODEL_DOCS}


@router.post(
    "/models/{name}/infer", summary="Infer (v2)", openapi_extra=_INFER_DOC, responses=_INFER_RESPONSES
)
@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Infer (v2)",
    openapi_extra=_INFER_DOC,
    responses=_INFER_RESPONSES,
)
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    async def call() -> Response:
        authorize(request, "read")
        loaded = _model(request, name, version)
        header, binary = _split_body(await request.body(), request.headers.get(HEADER_LENGTH))
        inputs = _inputs(header, binary)
        vectors, model_id = await _embed(request, inputs)
        return _infer_response(header, loaded, model_id, vectors)

    return await _protocol(call)


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """(JSON header, the binary tensor bytes after it) of a JSON or binary-extension request."""
    if header_length is None:
        head, rest = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length is {header_length!r}, the body has {len(body)} bytes"
            )
        head, rest = body[: int(header_length)], body[int(header_length) :]
    try:
        header = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the inference request is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise ProtocolError("the inference request needs an 'inputs' list with one tensor")
    return header, rest


def _inputs(header: dict[str, Any], binary: bytes) -> dict[str, Any]:
    """{"images": [bytes, ...]} or {"input": float32 array} from the request's one input tensor."""
    tensors = header["inputs"]
    offset = 0
    out: dict[str, Any] = {}
    for tensor in tensors:
        if not isinstance(tensor, dict):
            raise ProtocolError("each input must be an object with name, shape, datatype and data")
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if name not in (IMAGES, TENSOR):
            raise ProtocolError(
                f"unknown input {name!r}; this model takes {IMAGES!r} (BYTES) or {TENSOR!r} (FP32)"
            )
        expected = "BYTES" if name == IMAGES else "FP32"
        if datatype != expected:
            raise ProtocolError(f"input {name!r} must have datatype {expected}, got {datatype!r}")
        if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(
                f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}"
            )
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size {size!r} runs past the request body")
            raw, offset = binary[offset : offset + size], offset + size
            value = _bytes_elements(raw, name) if name == IMAGES else _fp32_raw(raw, name)
        elif "data" in tensor:
            value = (
                _json_elements(tensor["data"], name) if name == IMAGES else _fp32_json(tensor["data"], name)
            )
        else:
            raise ProtocolError(f"input {name!r} has neither 'data' nor binary_data_size")
        count = int(np.prod(shape))
        got = len(value) if name == IMAGES else int(value.size)
        if got != count:
            raise ProtocolError(f"input {name!r}: shape {shape} holds {count} elements, the data has {got}")
        out[name] = value if name == IMAGES else value.reshape(shape)
    if len(out) != 1:
        raise ProtocolError(f"give exactly one input, {IMAGES!r} or {TENSOR!r}, not both")
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data follow the last input")
    return out


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """BYTES in the binary extension: each element is a 4-byte little-endian length and that many bytes."""
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: truncated BYTES element length at byte {i}")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise ProtocolError(f"input {name!r}: BYTES element at byte {i} claims {n} bytes, past the end")
        items.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return items


def _json_elements(data: Any, name: str) -> list[bytes]:
    """BYTES in JSON: base64 text per element (encoded images are not UTF-8 text)."""
    flat = _flatten(data)
    items = []
    for i, item in enumerate(flat):
        if not isinstance(item, str):
            raise ProtocolError(f"input {name!r}: element {i} must be a base64 string")
        try:
            items.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(f"input {name!r}: element {i} is not valid base64 ({exc})") from exc
    return items


def _fp32_raw(raw: bytes, name: str) -> np.ndarray:
    if len(raw) % 4:
        raise ProtocolError(f"input {name!r}: {len(raw)} bytes is not a whole number of FP32 values")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _fp32_json(data: Any, name: str) -> np.ndarray:
    flat = _flatten(data)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
        raise ProtocolError(f"input {name!r}: FP32 data must be numbers")
    with np.errstate(over="ignore"):
        return np.asarray(flat, dtype=np.float32)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise ProtocolError("tensor data must be a (possibly nested) list")
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


async def _embed(request: Request, inputs: dict[str, Any]) -> tuple[np.ndarray, str]:
    """Through the runtime's batching engine, as /v1/embed: images decoded by the bundle's preprocessing, or
    ready tensors checked against the model's input shape."""
    runtime = _runtime(request)
    settings = request.app.state.settings
    if IMAGES in inputs:
        images = inputs[IMAGES]
        if not images:
            raise ProtocolError(f"input {IMAGES!r} holds no images")
        check_count(len(images), settings)
        return await runtime.embed_images(images)
    tensor: np.ndarray = inputs[TENSOR]
    check_count(len(tensor), settings)

    def fits(loaded: LoadedModel) -> None:
        if loaded.model.manifest.input.takes_pixels:  # no float input tensor to feed it
            raise ProtocolError(
                f"input {TENSOR!r}: this model takes uint8 pixels and normalises them in its graph "
                f"(manifest input.dtype uint8); send encoded images as {IMAGES!r}"
            )
        want = tuple(loaded.model.input_shape)
        if tensor.ndim != 1 + len(want) or tuple(tensor.shape[1:]) != want or len(tensor) == 0:
            dims = ", ".join(map(str, want))
            raise ProtocolError(
                f"input {TENSOR!r} must have shape [N, {dims}] with N >= 1, got {list(tensor.shape)}"
            )
        if not np.all(np.isfinite(tensor)):
            raise ProtocolError(f"input {TENSOR!r} contains NaN or infinite values")

    vectors, loaded = await runtime.models.embed_tensor(tensor, fits)
    return vectors, loaded.model_id


def _infer_response(
    header: dict[str, Any], loaded: LoadedModel, model_id: str, vectors: np.ndarray
) -> Response:
    requested = header.get("outputs") or [{"name": OUTPUT}]
    if not isinstance(requested, list) or any(
        not isinstance(o, dict) or o.get("name") != OUTPUT for o in requested
    ):
        raise ProtocolError(f"this model has one output, {OUTPUT!r}")
    params = header.get("parameters") or {}
    binary = bool(params.get("binary_data_output")) or any(
        bool((o.get("parameters") or {}).get("binary_data")) for o in requested
    )
    manifest = loaded.model.manifest
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    output: dict[str, Any] = {"name": OUTPUT, "datatype": "FP32", "shape": list(vectors.shape)}
    body: dict[str, Any] = {
        "model_name": manifest.name,
        "model_version": manifest.version,
        "outputs": [output],
        "parameters": {"model_id": model_id},
    }
    if isinstance(header.get("id"), str):
        body["id"] = header["id"]
    if not binary:
        output["data"] = vectors.reshape(-1).tolist()
        return JSONResponse(body)
    raw = vectors.tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps(body).encode()
    return Response(
        head + raw,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
