"""The hot read routes (embed, identify, verify) dispatched straight to their endpoint functions.

Those endpoints take the `Request` and return a finished `Response` themselves: no FastAPI dependencies, no
body parameters, no response-model serialisation. For them FastAPI's routing only adds cost (matching the
route table, the per-request exit stack, body-limit and request wrappers): on the digits model it was ~40%
of the server's CPU per request (0.30 -> 0.18 ms, docs/service.md, Speed). This pure ASGI layer sits inside
`RequestContextMiddleware` (request id, size limit, metrics, access log all still apply), calls the same
endpoint function FastAPI would, and turns exceptions into responses with the app's own exception handlers,
so the responses are identical (tests/service/test_hot_routes.py sends every case to an app with and one
without this layer and compares them). The routes stay registered with FastAPI for the OpenAPI schema, and
every other request (other paths and methods) goes through FastAPI as before.

It fails closed: anything FastAPI would run for a hot route besides the endpoint itself (a dependency such as
an API-key check, on the route, its router or the app; a body, query, path, header or cookie parameter) would
be skipped here, so the app refuses to start with such a route instead of answering it differently. Auth
is no exception: hot endpoints call `deps.read_context`, which makes the same `KeyRing.authorize` check as the
`require_scope` dependency of every other route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

HOT_PATHS = ("/v1/embed", "/v1/identify", "/v1/verify")

Handler = Callable[[Request, Exception], Awaitable[Response]]


def refusal(route: Any) -> str | None:
    """Why `route` (an APIRoute as the app includes it) cannot be dispatched without FastAPI (None: it can):
    what FastAPI would do for it that a direct call of its endpoint with the request would not."""
    dependant = route.dependant
    if route.methods != {"POST"}:
        return f"it answers {sorted(route.methods)}, hot routes are POST-only"
    if dependant.dependencies:
        names = [getattr(d.call, "__qualname__", repr(d.call)) for d in dependant.dependencies]
        return f"it has FastAPI dependencies {names} (on the route, its router or the app)"
    params = {
        "body": dependant.body_params,
        "query": dependant.query_params,
        "path": dependant.path_params,
        "header": dependant.header_params,
        "cookie": dependant.cookie_params,
    }
    for kind, found in params.items():
        if found:
            return f"it has {kind} parameters {[p.name for p in found]}"
    if dependant.request_param_name is None:
        return "its endpoint does not take the Request"
    others = [
        name
        for name in (
            dependant.response_param_name,
            dependant.background_tasks_param_name,
            dependant.http_connection_param_name,
            dependant.security_scopes_param_name,
        )
        if name is not None
    ]
    if others:
        return f"its endpoint takes {others}, which only FastAPI's routing provides"
    return None


def _included_routes(app: FastAPI) -> list[tuple[Any, APIRoute]]:
    """(the route with everything the app's includes add, the route as its router declared it) per route."""
    try:
        from fastapi.routing import iter_route_contexts  # newer FastAPI includes routers lazily
    except ImportError:
        return [(r, r) for r in app.routes if isinstance(r, APIRoute)]
    contexts = iter_route_contexts(app.routes)
    return [(c, c.original_route) for c in contexts if isinstance(c.original_route, APIRoute)]


def hot_endpoints(app: FastAPI, paths: tuple[str, ...] = HOT_PATHS) -> dict[str, tuple[Any, APIRoute]]:
    """Path -> (endpoint, route) of each hot path; `RuntimeError` naming every route that must not be hot."""
    # As the app includes them, so router- and app-level dependencies count.
    routes = [(r, original) for r, original in _included_routes(app) if r.path in paths]
    routes = [(r, original) for r, original in routes if "POST" in (r.methods or ())]
    problems = [f"{r.path}: {why}" for r, _ in routes if (why := refusal(r)) is not None]
    missing = sorted(set(paths) - {r.path for r, _ in routes})
    if missing:
        problems.append(f"{missing}: not registered as FastAPI routes")
    if len({r.path for r, _ in routes}) != len(routes):
        problems.append("a hot path is registered more than once")
    if problems:
        raise RuntimeError(
            "hot routes would answer differently from FastAPI, refusing to start: " + "; ".join(problems)
        )
    # The original route is what FastAPI puts in the scope (the metrics label is its path template).
    return {r.path: (r.endpoint, original) for r, original in routes}


class HotRoutes:
    """Checked when the app is built (`create_app`) and again when the middleware stack is (at start-up),
    so a route added in between cannot slip through."""

    def __init__(self, app: ASGIApp, *, fastapi: FastAPI, paths: tuple[str, ...] = HOT_PATHS) -> None:
        self.app = app
        self.fastapi = fastapi
        self.routes = hot_endpoints(fastapi, paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = scope["type"] == "http" and scope["method"] == "POST"
        route = self.routes.get(scope["path"]) if hot else None
        if route is None:
            await self.app(scope, receive, send)
            return
        endpoint, scope["route"] = route  # as FastAPI's router sets it: the metrics label is the template
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
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
