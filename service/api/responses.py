"""Responses of the hot routes, serialised once by pydantic's own JSON encoder.

A route that returns a pydantic model has FastAPI validate it against `response_model` and serialise it
again; the hot routes (embed, identify, verify) build their response models themselves from checked values,
so they return the JSON bytes directly. `response_model` stays on the route for the OpenAPI schema.
"""

from __future__ import annotations

from fastapi import Response
from pydantic import BaseModel


def json_response(model: BaseModel) -> Response:
    return Response(model.model_dump_json().encode(), media_type="application/json")
