"""POST /v1/verify: are two faces the same identity? Similarity against the calibrated threshold."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.bodies import read_body, request_body_doc
from service.api.deps import read_context
from service.api.errors import error_responses
from service.api.responses import json_response
from service.api.schemas import VerifyRequest, VerifyResponse

router = APIRouter(prefix="/v1", tags=["recognition"])

FILES = {"image_a": "image_a", "image_b": "image_b"}


@router.post(
    "/verify",
    response_model=VerifyResponse,
    summary="Verify two faces",
    description="Give each side as an image (`image_a`/`image_b`: base64 in JSON or file parts in multipart) "
    "or an embedding (`embedding_a`/`embedding_b`). `same` is `similarity >= threshold` (default: the "
    "calibrated threshold of the bundle that embedded them, the same line /v1/identify uses).",
    openapi_extra=request_body_doc(VerifyRequest, FILES),
    responses=error_responses(400, 401, 413, 415, 422, 503),
)
async def verify(request: Request) -> Response:
    runtime, settings = read_context(request)
    body, files = await read_body(request, VerifyRequest, settings, file_fields=FILES)
    sides = [
        (side, files[f"image_{side}"][0] if emb is None else None, emb)
        for side, emb in (("a", body.embedding_a), ("b", body.embedding_b))
    ]
    found = await runtime.verify(sides, body.threshold)
    decision = found.verification
    return json_response(
        VerifyResponse(
            model_id=found.model_id,
            similarity=decision.similarity,
            threshold=decision.threshold,
            same=decision.same,
        )
    )
