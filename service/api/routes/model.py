"""GET /v1/model: what is being served (the bundle manifest) and how (gallery and batching figures)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import RuntimeDep, require_read_key
from service.api.errors import error_responses
from service.api.schemas import BatchingInfo, GalleryInfo, ModelInfo

router = APIRouter(prefix="/v1", tags=["model"], dependencies=[Depends(require_read_key)])


@router.get(
    "/model", response_model=ModelInfo, summary="The served model", responses=error_responses(401, 503)
)
async def model_info(runtime: RuntimeDep) -> ModelInfo:
    loaded = runtime.current
    engine = loaded.engine
    return ModelInfo(
        model_id=loaded.model_id,
        loaded_at=loaded.loaded_at,
        # The manifest holds no secrets (paths, keys); it is what an operator needs to audit the model.
        manifest=loaded.model.manifest.model_dump(mode="json"),
        gallery=GalleryInfo(
            centers=runtime.gallery.num_centers,
            enrolled=runtime.gallery.num_enrolled,
            orphaned=await runtime.orphaned(),
        ),
        batching=BatchingInfo(
            max_batch_size=engine.max_batch_size,
            batch_wait_ms=engine.batch_wait_s * 1000.0,
            max_queue_depth=engine.max_queue_depth,
            queue_depth=engine.queue_depth,
        ),
    )
