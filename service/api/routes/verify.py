"""POST /v1/verify: are two faces the same identity? Similarity against the calibrated threshold."""

from __future__ import annotations

import numpy as np
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
    "or an embedding (`embedding_a`/`embedding_b`). `same` is `similarity >= threshold`.",
    openapi_extra=request_body_doc(VerifyRequest, FILES),
    responses=error_responses(400, 401, 413, 415, 422, 503),
)
async def verify(request: Request) -> Response:
    runtime, settings = read_context(request)
    body, files = await read_body(request, VerifyRequest, settings, file_fields=FILES)
    sides = [("a", body.embedding_a), ("b", body.embedding_b)]
    to_embed = [files[f"image_{s}"][0] for s, emb in sides if emb is None]
    model_id = runtime.current.model_id
    if to_embed:
        # Both images (when both are images) go to the model in one call.
        embedded, model_id = await runtime.embed_images(to_embed, field_name="image")
        embedded_rows = iter(embedded)
    vectors = []
    for side, emb in sides:
        if emb is None:
            vectors.append(next(embedded_rows))
        else:
            vectors.append(runtime.check_embeddings([emb], f"embedding_{side}")[0])
    a, b = (v / np.linalg.norm(v) for v in vectors)
    similarity = float(np.clip(np.dot(a, b), -1.0, 1.0))
    threshold = body.threshold if body.threshold is not None else runtime.default_threshold
    return json_response(
        VerifyResponse(
            model_id=model_id, similarity=similarity, threshold=threshold, same=similarity >= threshold
        )
    )
