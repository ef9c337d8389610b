"""The one place failures become HTTP responses: `{"error": {"code", "message", "detail"}}` with a status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors as e
from service.api.schemas import ErrorResponse

logger = logging.getLogger("idembed.api")

STATUS: dict[type[e.ServiceError], int] = {
    e.InvalidImageError: 400,
    e.AuthenticationError: 401,
    e.ForbiddenError: 403,
    e.IdentityNotFoundError: 404,
    e.IdentityConflictError: 409,
    e.SnapshotUnavailableError: 409,
    e.ModelChangeRefusedError: 409,
    e.PayloadTooLargeError: 413,
    e.UnsupportedMediaTypeError: 415,
    e.InvalidInputError: 422,
    e.InvalidBundleError: 422,
    e.NotReadyError: 503,
    e.OverloadedError: 503,
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the error statuses a route can return."""
    text = {
        400: "undecodable image or malformed body",
        401: "missing or wrong API key",
        403: "the API key lacks the scope this call needs (read, write or admin)",
        404: "unknown identity",
        409: "identity already enrolled (use replace)",
        413: "payload, image or batch over the configured limit",
        415: "unsupported content type or image format",
        422: "schema or value violation",
        503: "model not ready, or overloaded (see Retry-After)",
    }
    if 401 in codes:
        codes = (*codes, 403)  # every authenticated route can also meet a key without its scope
    return {c: {"model": ErrorResponse, "description": text[c]} for c in sorted(set(codes))}


def error_json(
    status: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
):
    return JSONResponse(
        {"error": {"code": code, "message": message, "detail": detail}}, status_code=status, headers=headers
    )


def status_of(exc: e.ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.ServiceError)
    headers = None
    if isinstance(exc, e.OverloadedError):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, e.NotReadyError):
        headers = {"Retry-After": "1"}
    elif isinstance(exc, e.AuthenticationError):
        headers = {"WWW-Authenticate": "ApiKey"}
    return error_json(status_of(exc), exc.code, exc.message, exc.detail, headers)


def _clean_errors(errors: Any) -> list[dict[str, Any]]:
    # Pydantic error dicts may hold the offending input (possibly a huge base64 string) and exception
    # objects in `ctx`; keep what a client needs to fix the request.
    return [
        {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        for err in errors
    ]


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _clean_errors(exc.errors())
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    return error_json(422, "validation_error", f"{where}: {first['msg']}", errors)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if request.url.path.startswith("/v2/") or request.url.path == "/v2":
        # The Open Inference Protocol's error shape (service/api/routes/v2.py).
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 400: "bad_request"}
    code = codes.get(exc.status_code, f"http_{exc.status_code}")
    return error_json(exc.status_code, code, str(exc.detail), None, dict(exc.headers or {}) or None)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", extra={"path": request.url.path})
    return error_json(500, "internal_error", "internal server error; see the server log for this request id")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(e.ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
