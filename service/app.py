"""The FastAPI application: `create_app(settings)` wires runtime, routes, errors, middleware and metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from bundle.errors import BundleError
from service.api.auth import KeyRing
from service.api.errors import install_error_handlers
from service.api.hot_routes import HotRoutes, hot_endpoints
from service.api.metrics import ServiceMetrics
from service.api.middleware import RequestContextMiddleware
from service.api.pages import install_pages
from service.api.routes import ROUTERS
from service.core.audit import AuditLog
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
* **enroll** identities (durable in SQLite WAL).

Every route except the probes and metrics needs an `X-API-Key` with the right scope: `read` (embed,
identify, verify, list, model, /v2), `write` (enroll, delete) or `admin` (reload, snapshot); reads can be
opened with `IDEMBED_REQUIRE_KEY_FOR_READS=false`. Writes are recorded in an append-only audit log. A web
console is at `/console`; the Open Inference Protocol (KServe v2) is under `/v2`.

Errors are `{"error": {"code", "message", "detail"}}`.
"""


def create_app(settings: Settings | None = None, *, hot_routes: bool = True) -> FastAPI:
    """An app serving `settings.bundle_path`; the bundle is loaded and warmed in the lifespan start-up.

    Start-up fails (and the server exits) with the bundle or store problem named, rather than serving errors.
    `hot_routes=False` sends the hot read routes through FastAPI's routing too (the same answers, slower:
    the tests compare the two).
    """
    settings = settings or Settings()
    metrics = ServiceMetrics()
    runtime = ServiceRuntime(settings, observer=metrics.observe_batch, on_model_change=metrics.set_model)

    keyring = KeyRing.from_settings(settings)
    audit = AuditLog(settings.audit_path().absolute())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level, settings.log_format)
        # Relative defaults (models/default, data/) depend on the working folder: say which paths they became.
        logger.info(
            "starting",
            extra={
                "working_folder": str(Path.cwd()),
                "bundle": str(settings.bundle_path.absolute()),
                "store": settings.store_url.split("@")[-1],  # no credentials in logs
            },
        )
        log_access_policy(keyring, audit)
        try:
            audit.open()
            await runtime.start()
        except OSError as exc:
            runtime.startup_error = f"cannot open the audit log {audit.path}: {exc}"
            logger.error("start-up failed: %s (IDEMBED_AUDIT_LOG_PATH)", runtime.startup_error)
            raise
        except (BundleError, StoreError) as exc:
            runtime.startup_error = str(exc)
            logger.error("start-up failed: %s (working folder %s)", exc, Path.cwd())
            raise
        try:
            yield
        finally:
            logger.info("shutting down: finishing queued batches")
            await runtime.stop()
            audit.close()

    app = FastAPI(
        title="idembed",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # Served from local files by install_pages: FastAPI's defaults load them from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.keyring = keyring
    app.state.audit = audit
    metrics.bind(
        queue_depth=lambda: runtime.current.engine.queue_depth if runtime.ready else 0,
        centers=lambda: runtime.gallery.num_centers if runtime.ready else 0,
        enrolled=lambda: runtime.gallery.num_enrolled if runtime.ready else 0,
    )
    metrics.bind_reembedding(lambda: runtime.job)
    for router in ROUTERS:
        app.include_router(router)
    install_pages(app)
    install_error_handlers(app)
    if hot_routes:
        hot_endpoints(app)  # refuses, now, a hot route that would answer differently from FastAPI
        # Added first, so it runs inside RequestContextMiddleware (the last added is the outermost).
        app.add_middleware(HotRoutes, fastapi=app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_payload_bytes)
    return app


def log_access_policy(keyring: KeyRing, audit: AuditLog) -> None:
    """Say at start-up who may do what: key ids per scope, and loudly when a scope has no key at all."""
    scopes = {scope: keyring.with_scope(scope) for scope in ("read", "write", "admin")}
    logger.info(
        "access policy",
        extra={
            "reads_open": keyring.reads_open,
            "keys": {g.key_id: sorted(g.scopes) for g in keyring.grants},
            "audit_log": str(audit.path),
        },
    )
    if keyring.reads_open:
        logger.warning(
            "reads are open (IDEMBED_REQUIRE_KEY_FOR_READS=false): anyone who reaches this port can embed, "
            "identify, verify and list enrolled identities"
        )
    elif not scopes["read"]:
        logger.warning(
            "no API key with the read scope (IDEMBED_API_KEYS or IDEMBED_READ_KEYS): every embed, identify, "
            "verify and list request will get 401"
        )
    if not scopes["write"]:
        logger.warning(
            "writes are disabled: no API key with the write scope (IDEMBED_API_KEYS or IDEMBED_WRITE_KEYS); "
            "enroll and delete get 401"
        )
    if not scopes["admin"]:
        logger.info(
            "admin calls (reload, snapshot) are disabled: no key in IDEMBED_API_KEYS or IDEMBED_ADMIN_KEYS"
        )
