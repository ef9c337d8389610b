"""The FastAPI application: `create_app(settings)` wires runtime, routes, errors, middleware and metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from bundle.errors import BundleError
from service.api.errors import install_error_handlers
from service.api.hot_routes import HotRoutes
from service.api.metrics import ServiceMetrics
from service.api.middleware import RequestContextMiddleware
from service.api.routes import ROUTERS
from service.core.config import Settings
from service.core.logging import configure_logging
from service.gallery.store import StoreError
from service.runtime import ServiceRuntime

logger = logging.getLogger("idembed.app")

DESCRIPTION = """
Identity embeddings learned with softmax + center loss, served with onnxruntime.

* **embed** images to L2-normalised embeddings (concurrent requests are micro-batched);
* **identify** a face against the bundle's class centers and enrolled identities (top-k, unknown rejection);
* **verify** whether two faces are the same identity at the calibrated threshold;
* **enroll** identities (durable in SQLite WAL); writes need `X-API-Key`.

Errors are `{"error": {"code", "message", "detail"}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """An app serving `settings.bundle_path`; the bundle is loaded and warmed in the lifespan start-up.

    Start-up fails (and the server exits) with the bundle or store problem named, rather than serving errors.
    """
    settings = settings or Settings()
    metrics = ServiceMetrics()
    runtime = ServiceRuntime(settings, observer=metrics.observe_batch, on_model_change=metrics.set_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level, settings.log_format)
        try:
            await runtime.start()
        except (BundleError, StoreError) as exc:
            runtime.startup_error = str(exc)
            logger.error("start-up failed: %s", exc)
            raise
        try:
            yield
        finally:
            logger.info("shutting down: finishing queued batches")
            await runtime.stop()

    app = FastAPI(
        title="idembed",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.metrics = metrics
    metrics.bind(
        queue_depth=lambda: runtime.current.engine.queue_depth if runtime.ready else 0,
        centers=lambda: runtime.gallery.num_centers if runtime.ready else 0,
        enrolled=lambda: runtime.gallery.num_enrolled if runtime.ready else 0,
    )
    metrics.bind_reembedding(lambda: runtime.job)
    for router in ROUTERS:
        app.include_router(router)
    install_error_handlers(app)
    # Added first, so it runs inside RequestContextMiddleware (the last added is the outermost).
    app.add_middleware(HotRoutes, fastapi=app, routers=ROUTERS)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_payload_bytes)
    return app
