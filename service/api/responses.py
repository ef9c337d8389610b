"""Responses of the hot routes, serialised once, without FastAPI's response-model pass.

A route that returns a pydantic model has FastAPI validate it against `response_model` and serialise it
again; the hot routes (embed, identify, verify) build their responses themselves from checked values, so they
return the JSON bytes directly. `response_model` stays on the route for the OpenAPI schema.
"""

from __future__ import annotations

import numpy as np
import orjson
from fastapi import Response
from pydantic import BaseModel


def json_response(model: BaseModel) -> Response:
    return Response(model.model_dump_json().encode(), media_type="application/json")


def embed_response(model_id: str, vectors: np.ndarray) -> Response:
    """`EmbedResponse` JSON written by orjson straight from the [n, dim] array.

    Building the pydantic model first costs `tolist()` plus a validation of every float: 32 x 128 floats
    took 365 us that way against 139 us here (docs/service.md, Speed). The values are widened to float64,
    so each is written exactly as Python (and pydantic) would write that float: the same shortest
    round-trip digits, the same JSON.
    """
    body = {"model_id": model_id, "dim": int(vectors.shape[1]), "embeddings": vectors.astype(np.float64)}
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")
