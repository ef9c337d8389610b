"""The hot read routes (embed, identify, verify) dispatched straight to their endpoint functions.

Those endpoints take the `Request` and return a finished `Response` themselves: no FastAPI dependencies, no
body parameters, no response-model serialisation. For them FastAPI's routing only adds cost (matching the
route table, the per-request exit stack, body-limit and request wrappers): on the digits model it was ~40%
of the server's CPU per request (0.30 -> 0.18 ms, docs/service.md, Speed). This pure ASGI layer sits inside
`RequestContextMiddleware` (request id, size limit, metrics, access log all still apply), calls the same
endpoint function FastAPI would, and turns exceptions into responses with the app's own exception handlers,
so the responses are identical. The routes stay registered with FastAPI for the OpenAPI schema, and every
other request (other paths and methods) goes through FastAPI as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

HOT_PATHS = ("/v1/embed", "/v1/identify", "/v1/verify")

Handler = Callable[[Request, Exception], Awaitable[Response]]


class HotRoutes:
    def __init__(
        self,
        app: ASGIApp,
        *,
        fastapi: FastAPI,
        routers: Iterable[APIRouter],
        paths: tuple[str, ...] = HOT_PATHS,
    ) -> None:
        self.app = app
        self.fastapi = fastapi
        # From the routers the app includes (without an extra prefix), so each route's path is the full path.
        self.routes = {
            route.path: route
            for router in routers
            for route in router.routes
            if isinstance(route, APIRoute) and route.path in paths and route.methods == {"POST"}
        }
        missing = set(paths) - set(self.routes)
        if missing:
            raise RuntimeError(f"hot routes not registered as POST-only FastAPI routes: {sorted(missing)}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = scope["type"] == "http" and scope["method"] == "POST"
        route = self.routes.get(scope["path"]) if hot else None
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # as FastAPI's router sets it: the metrics label is the route template
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise  # unexpected: Starlette's ServerErrorMiddleware answers 500 and logs, as for any route
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Handler | None:
        """The app's handler for this exception type (nearest in its MRO), except the catch-all one."""
        handlers = self.fastapi.exception_handlers
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            if cls in handlers:
                return handlers[cls]  # type: ignore[return-value]
        return None
