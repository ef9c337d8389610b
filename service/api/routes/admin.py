"""POST /v1/admin/reload: hot-swap the served bundle (authenticated); a bad bundle is refused."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.api.bodies import json_body_doc, read_optional_json
from service.api.deps import RuntimeDep, require_write_key
from service.api.errors import error_responses
from service.api.schemas import ReloadRequest, ReloadResponse

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_write_key)])


@router.post(
    "/reload",
    response_model=ReloadResponse,
    summary="Hot-reload the model bundle",
    description="Loads and verifies the bundle (checksums, shapes, warm-up) before swapping it in. Requests "
    "in flight finish on the old model. A bundle that fails any check is refused with 422 and the current "
    "model keeps serving.",
    openapi_extra=json_body_doc(ReloadRequest, required=False),
    responses=error_responses(401, 415, 422, 503),
)
async def reload_bundle(request: Request, runtime: RuntimeDep) -> ReloadResponse:
    body = await read_optional_json(request, ReloadRequest)
    new, previous = await runtime.reload(body.bundle)
    return ReloadResponse(
        model_id=new.model_id,
        previous_model_id=previous,
        loaded_at=new.loaded_at,
        warmup_ms=new.model.warmup_ms,
    )
