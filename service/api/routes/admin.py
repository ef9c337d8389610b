"""Admin endpoints (authenticated): /v1/admin/reload hot-swaps the served bundle (a bad one is refused);
/v1/admin/snapshot saves the gallery index so that the next start loads it instead of rebuilding it."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from service.api.bodies import json_body_doc, read_optional_json
from service.api.deps import RuntimeDep, audited, require_admin_key
from service.api.errors import error_responses
from service.api.schemas import ErrorResponse, ReembedStatus, ReloadRequest, ReloadResponse, SnapshotResponse
from service.gallery.service import ReembedJob

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin_key)])


@router.post(
    "/reload",
    response_model=ReloadResponse,
    summary="Hot-reload the model bundle",
    description="Loads and verifies the bundle (checksums, shapes, warm-up) before swapping it in. Requests "
    "in flight finish on the old model. A bundle that fails any check is refused with 422 and the current "
    "model keeps serving. Another model (another name:version) would orphan the identities the served "
    "one enrolled: refused with 409 naming how many, unless `force` is set. With "
    "IDEMBED_KEEP_ENROLLMENT_IMAGES, identities with kept images are re-embedded by the new model in the "
    "background instead (202 with the job's status; the old model serves until the swap).",
    openapi_extra=json_body_doc(ReloadRequest, required=False),
    responses={
        **error_responses(401, 415, 422, 503),
        202: {"model": ReembedStatus, "description": "re-embedding in the background, then the swap"},
        409: {"model": ErrorResponse, "description": "would orphan enrolled identities (send force=true)"},
    },
)
async def reload_bundle(request: Request, runtime: RuntimeDep) -> ReloadResponse | Response:
    body = await read_optional_json(request, ReloadRequest)
    async with audited(request, "reload", None, 200) as detail:
        detail["bundle"] = body.bundle
        result = await runtime.reload(body.bundle, force=body.force)
        if result.job is not None:
            detail.update(reembedding=True)
            status = job_status(result.job).model_dump_json()
            return Response(status, status_code=202, media_type="application/json")
        new = result.model
        detail.update(
            model_id=new.model_id, previous_model_id=result.previous_model_id, orphaned=result.orphaned
        )
    return ReloadResponse(
        model_id=new.model_id,
        previous_model_id=result.previous_model_id,
        loaded_at=new.loaded_at,
        warmup_ms=new.model.warmup_ms,
        orphaned=result.orphaned,
    )


@router.post(
    "/snapshot",
    response_model=SnapshotResponse,
    summary="Save the gallery index snapshot now",
    description="Writes the hnsw/auto gallery index and its manifest into IDEMBED_GALLERY_SNAPSHOT_PATH "
    "(atomically; the previous snapshot stays valid until the new one is complete), as graceful shutdown "
    "does. Enrollments wait while the index is written; at start-up the service loads the snapshot and "
    "replays the store's changes since it instead of re-inserting every identity.",
    responses={
        **error_responses(401, 503),
        409: {"model": ErrorResponse, "description": "no snapshot folder configured, or an exact index"},
        500: {"model": ErrorResponse, "description": "the snapshot could not be written (disk, permissions)"},
    },
)
async def write_snapshot(request: Request, runtime: RuntimeDep) -> SnapshotResponse:
    async with audited(request, "snapshot", None, 200):
        manifest = await runtime.write_snapshot()
    assert runtime.settings.gallery_snapshot_path is not None  # write_snapshot refuses otherwise
    return SnapshotResponse(
        path=str(runtime.settings.gallery_snapshot_path),
        **manifest.model_dump(
            include={
                "index_kind",
                "identities",
                "cursor",
                "index_file",
                "index_bytes",
                "index_sha256",
                "created_at",
                "write_seconds",
            }
        ),
    )


def job_status(job: ReembedJob | None) -> ReembedStatus:
    if job is None:
        return ReembedStatus(state="idle")
    return ReembedStatus(
        state=job.state,
        model_id=job.model_id,
        previous_model_id=job.previous_model_id,
        total=job.total,
        done=job.done,
        skipped=job.skipped,
        orphaned=job.without_images,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
    )


@router.get(
    "/reembed",
    response_model=ReembedStatus,
    summary="Progress of the gallery re-embedding",
    description="The latest re-embedding started by a reload (idle if none): identities done out of total. "
    "Authenticated like the other admin endpoints.",
    responses=error_responses(401, 503),
)
async def reembed_status(runtime: RuntimeDep) -> ReembedStatus:
    return job_status(runtime.job)
