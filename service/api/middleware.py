"""Per-request plumbing as one pure ASGI middleware: request id, body size limit, access log and metrics.

Pure ASGI rather than Starlette's BaseHTTPMiddleware: it adds no extra task or body copy per request, which
matters for the <= 1 ms single-request overhead target.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_json
from service.api.metrics import ServiceMetrics
from service.core.inflight import IN_FLIGHT
from service.core.logging import request_id_var

logger = logging.getLogger("idembed.access")

REQUEST_ID_HEADER = "x-request-id"
# A caller-supplied id is echoed only if it is short and plain, so it cannot inject into logs or headers.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Generated ids: a random per-process prefix plus a counter; unique without an os.urandom call per request
# (uuid4), which profiling showed at ~150 us on a busy VM.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = length = None
        framed = True  # the body is framed by Content-Length alone (no Transfer-Encoding)
        for name, value in scope["headers"]:  # three headers wanted: no dict of all of them per request
            if name == b"content-length":
                length = value
            elif name == b"x-request-id":
                supplied = value.decode("latin-1")
            elif name == b"transfer-encoding":
                framed = False
        if supplied is not None and _SAFE_ID.match(supplied):
            request_id = supplied
        else:
            request_id = f"{_ID_PREFIX}-{next(_ID_COUNTER):08x}"
        id_header = (b"x-request-id", request_id.encode())
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 500
        IN_FLIGHT.count += 1

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                too_big = error_json(
                    413,
                    "payload_too_large",
                    f"request body over the limit of {self.max_body_bytes} bytes (IDEMBED_MAX_PAYLOAD_BYTES)",
                    {"max_payload_bytes": self.max_body_bytes},
                )
                await too_big(scope, receive, send_with_id)
            elif length is not None and framed:
                # The declared length is within the limit and the server never passes more body than that
                # (httptools/h11 frame the request by it), so no counting wrapper is needed.
                await self.app(scope, receive, send_with_id)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        finally:
            IN_FLIGHT.count -= 1
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            # The route template (/v1/identities/{name}), never the raw path: bounded label cardinality.
            path = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.observe_request(path, method, status, elapsed)
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "request",
                    extra={
                        "method": method,
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                        "client": (scope.get("client") or ("-",))[0],
                    },
                )
            request_id_var.reset(token)

    def _limited(self, receive: Receive) -> Receive:
        # Chunked bodies have no Content-Length: count while reading. FastAPI re-raises HTTPException from
        # body parsing as-is, so this surfaces as a 413 through the normal error handler.
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise HTTPException(413, f"request body over the limit of {self.max_body_bytes} bytes")
            return message

        return receive_limited
