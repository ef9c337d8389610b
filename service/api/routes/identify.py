"""POST /v1/identify: top-k matches over class centers and enrolled identities, with unknown rejection."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.bodies import check_count, read_body, request_body_doc
from service.api.deps import read_context
from service.api.errors import error_responses
from service.api.responses import json_response
from service.api.schemas import Identification, IdentifyRequest, IdentifyResponse, Match
from service.errors import InvalidInputError

router = APIRouter(prefix="/v1", tags=["recognition"])

FILES = {"images": "images", "image": "images"}


@router.post(
    "/identify",
    response_model=IdentifyResponse,
    summary="Identify faces against the gallery",
    description="Each query (image or embedding) gets its top-k matches; the best one is the answer if its "
    "similarity reaches `threshold` (default: the bundle's calibrated threshold), else `unknown: true`.",
    openapi_extra=request_body_doc(IdentifyRequest, FILES),
    responses=error_responses(400, 401, 413, 415, 422, 503),
)
async def identify(request: Request) -> Response:
    runtime, settings = read_context(request)
    body, files = await read_body(request, IdentifyRequest, settings, file_fields=FILES)
    if body.top_k > settings.max_top_k:
        raise InvalidInputError(
            f"top_k is {body.top_k}; this server allows 1 to {settings.max_top_k} (IDEMBED_MAX_TOP_K)",
            detail={"max_top_k": settings.max_top_k},
        )
    if body.embeddings is not None:
        check_count(len(body.embeddings), settings, "embeddings")
    vectors, model_id = await runtime.query_vectors(files.get("images"), body.embeddings)
    threshold = body.threshold if body.threshold is not None else runtime.default_threshold
    results = []
    for matches in await runtime.search(vectors, body.top_k):
        best = matches[0] if matches else None
        known = best is not None and best.similarity >= threshold
        results.append(
            Identification(
                identity=best.name if known and best is not None else None,
                unknown=not known,
                similarity=best.similarity if best is not None else None,
                matches=[Match(identity=m.name, similarity=m.similarity, source=m.source) for m in matches],
            )
        )
    return json_response(IdentifyResponse(model_id=model_id, threshold=threshold, results=results))
