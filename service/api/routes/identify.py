"""POST /v1/identify: top-k matches over enrolled identities and/or class centers, with unknown rejection."""

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
    description="Each query (image or embedding) gets its top-k matches among `sources` (enrolled "
    "identities, the bundle's training-identity centers, or both; default IDEMBED_IDENTIFY_SOURCES); the "
    "best one is the answer if its similarity reaches `threshold` (default: the bundle's calibrated "
    "threshold), else `unknown: true`. Only identities enrolled by the served model are ever matched.",
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
    found = await runtime.identify(
        files.get("images"), body.embeddings, top_k=body.top_k, threshold=body.threshold, sources=body.sources
    )
    results = [
        Identification(
            identity=r.identity,
            unknown=not r.known,
            similarity=r.best.similarity if r.best is not None else None,
            matches=[Match(identity=m.name, similarity=m.similarity, source=m.source) for m in r.matches],
        )
        for r in found.results
    ]
    return json_response(
        IdentifyResponse(
            model_id=found.model_id, threshold=found.threshold, sources=found.sources, results=results
        )
    )
