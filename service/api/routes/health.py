"""Probes and metrics: /healthz (process alive), /readyz (model loaded and warm), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import RuntimeDep
from service.api.errors import error_responses
from service.api.schemas import Health
from service.errors import NotReadyError

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: a verified, warmed-up model serves an up-to-date gallery",
    responses=error_responses(503),
)
async def readyz(runtime: RuntimeDep) -> Health:
    reason = runtime.readiness()
    if reason is not None:
        raise NotReadyError(reason)
    return Health(status="ready", model_id=runtime.current.model_id)


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
