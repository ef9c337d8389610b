"""The embed response written by orjson from the array is byte-identical to the pydantic model's JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.api.responses import embed_response, json_response
from service.api.schemas import EmbedResponse


@pytest.mark.parametrize("seed", range(20))
def test_embed_response_matches_the_pydantic_serialisation_byte_for_byte(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, dim = int(rng.integers(1, 33)), int(rng.choice([3, 64, 128, 512]))
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[0, :3] = [1e-8, -0.0, 1.0]  # exponent notation, signed zero, an integral value
    expected = json_response(EmbedResponse(model_id="m:1", dim=dim, embeddings=vectors.tolist()))
    got = embed_response("m:1", vectors)
    assert got.body == expected.body
    assert got.media_type == "application/json"
    assert json.loads(got.body)["embeddings"] == vectors.tolist()  # float32 values exactly, widened
