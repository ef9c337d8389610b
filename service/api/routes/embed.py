"""POST /v1/embed: images -> L2-normalised embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.bodies import read_body, request_body_doc
from service.api.deps import read_context
from service.api.errors import error_responses
from service.api.responses import embed_response
from service.api.schemas import EmbedRequest, EmbedResponse

router = APIRouter(prefix="/v1", tags=["embeddings"])

FILES = {"images": "images", "image": "images"}


@router.post(
    "/embed",
    response_model=EmbedResponse,
    summary="Embed images",
    description="JSON with base64 `images`, or multipart with one or more `images` (or `image`) file parts. "
    "Concurrent requests are batched into one model call; each gets exactly its own embeddings.",
    openapi_extra=request_body_doc(EmbedRequest, FILES),
    responses=error_responses(400, 401, 413, 415, 422, 503),
)
async def embed(request: Request) -> Response:
    runtime, settings = read_context(request)
    _, files = await read_body(request, EmbedRequest, settings, file_fields=FILES)
    vectors, model_id = await runtime.embed_images(files["images"])
    return embed_response(model_id, vectors)
