"""Request and response bodies of the v1 API: one set of pydantic models for OpenAPI, routes and client."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

# JSON cannot carry NaN/inf in standard form, but Python's parser accepts `NaN`/`Infinity`: refuse them.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Embedding = Annotated[list[FiniteFloat], Field(min_length=1, max_length=65536)]
Base64Image = Annotated[str, StringConstraints(min_length=1)]
Similarity = Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)]
MetadataValue = str | int | float | bool | None
SearchSources = Literal["enrolled", "centers", "both"]

# An 8x8 grayscale PNG, small enough to show in the OpenAPI examples.
_EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAAF0lEQVR4nGNkYIEARgUog4UUBuMDKAMAR1gCmJsliJIAAAAASUVORK5CYII"
    "="
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def validate_identity_name(name: str) -> str:
    """Identity names are used in URL paths: no slashes, control characters, or surrounding whitespace."""
    if not 1 <= len(name) <= 128:
        raise ValueError("name must have 1 to 128 characters")
    if name != name.strip():
        raise ValueError("name must not start or end with whitespace")
    if name in {".", ".."} or "/" in name or "\\" in name:
        raise ValueError("name must not contain '/' or '\\' or be '.' or '..'")
    if any(unicodedata.category(c) in {"Cc", "Cf", "Cs", "Co", "Cn"} for c in name):
        raise ValueError("name must not contain control, format or unassigned characters")
    return name


class EmbedRequest(_Request):
    """Images as standard base64 (a `data:` URL prefix is accepted)."""

    images: list[Base64Image] = Field(min_length=1, description="base64-encoded PNG/JPEG/PGM/BMP images")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"images": [_EXAMPLE_PNG]}]})


class EmbedResponse(BaseModel):
    model_id: str = Field(description="name:version of the model that computed the embeddings")
    dim: int
    embeddings: list[list[float]] = Field(description="one L2-normalised embedding per input image, in order")

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={"examples": [{"model_id": "digits:1", "dim": 3, "embeddings": [[0.6, 0.0, 0.8]]}]},
    )


class IdentifyRequest(_Request):
    """Either `images` or `embeddings` (not both); each is identified independently."""

    images: list[Base64Image] | None = Field(None, min_length=1)
    embeddings: list[Embedding] | None = Field(None, min_length=1)
    top_k: int = Field(5, ge=1, le=10_000, description="matches per query (the server caps it at max_top_k)")
    threshold: Similarity | None = Field(
        None, description="similarity needed to accept the best match; default: the bundle's calibrated one"
    )
    sources: SearchSources | None = Field(
        None,
        description="what to search: enrolled (identities enrolled through the API), centers (the bundle's "
        "training identities) or both; default: the server's IDEMBED_IDENTIFY_SOURCES",
    )

    @model_validator(mode="after")
    def _one_input(self) -> IdentifyRequest:
        if (self.images is None) == (self.embeddings is None):
            raise ValueError("give exactly one of images or embeddings")
        return self

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"images": [_EXAMPLE_PNG], "top_k": 3}]}
    )


class Match(BaseModel):
    identity: str
    similarity: float
    source: Literal["center", "enrolled"] = Field(
        description="center: a class center exported with the model; enrolled: enrolled through the API"
    )


class Identification(BaseModel):
    identity: str | None = Field(description="best match if its similarity reaches the threshold, else null")
    unknown: bool = Field(description="true when no match reaches the threshold")
    similarity: float | None = Field(description="similarity of the best match (null: empty gallery)")
    matches: list[Match] = Field(description="top-k matches, best first, whatever the threshold")


class IdentifyResponse(BaseModel):
    model_id: str
    threshold: float = Field(description="the line that decided known/unknown (the request's or bundle's)")
    sources: SearchSources = Field(description="what was searched")
    results: list[Identification] = Field(description="one result per query, in order")

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model_id": "digits:1",
                    "threshold": 0.52,
                    "sources": "both",
                    "results": [
                        {
                            "identity": "7",
                            "unknown": False,
                            "similarity": 0.93,
                            "matches": [
                                {"identity": "7", "similarity": 0.93, "source": "center"},
                                {"identity": "alice", "similarity": 0.41, "source": "enrolled"},
                            ],
                        }
                    ],
                }
            ]
        },
    )


class VerifyRequest(_Request):
    """Two faces to compare, each given as an image or an embedding."""

    image_a: Base64Image | None = None
    image_b: Base64Image | None = None
    embedding_a: Embedding | None = None
    embedding_b: Embedding | None = None
    threshold: Similarity | None = Field(None, description="default: the bundle's calibrated threshold")

    @model_validator(mode="after")
    def _two_sides(self) -> VerifyRequest:
        for side in ("a", "b"):
            if (getattr(self, f"image_{side}") is None) == (getattr(self, f"embedding_{side}") is None):
                raise ValueError(f"give exactly one of image_{side} or embedding_{side}")
        return self

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"image_a": _EXAMPLE_PNG, "image_b": _EXAMPLE_PNG}]},
    )


class VerifyResponse(BaseModel):
    model_id: str
    similarity: float = Field(description="cosine similarity of the two embeddings")
    threshold: float
    same: bool = Field(description="similarity >= threshold")

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [{"model_id": "digits:1", "similarity": 0.87, "threshold": 0.52, "same": True}]
        },
    )


class EnrollRequest(_Request):
    """One identity from one or more images (or embeddings); its template is their normalised mean."""

    name: str = Field(description="unique name; 1-128 characters, no '/', '\\' or control characters")
    images: list[Base64Image] | None = Field(None, min_length=1)
    embeddings: list[Embedding] | None = Field(None, min_length=1)
    metadata: dict[str, MetadataValue] = Field(default_factory=dict, max_length=64)
    replace: bool = Field(False, description="overwrite an identity already enrolled under this name")

    _name = field_validator("name")(classmethod(lambda cls, v: validate_identity_name(v)))

    @model_validator(mode="after")
    def _one_input(self) -> EnrollRequest:
        if (self.images is None) == (self.embeddings is None):
            raise ValueError("give exactly one of images or embeddings")
        return self

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "alice", "images": [_EXAMPLE_PNG], "metadata": {"team": "blue"}}]
        },
    )


class Identity(BaseModel):
    name: str
    image_count: int
    model_id: str = Field(description="model whose embeddings formed this identity's template")
    metadata: dict[str, Any]
    created_at: datetime
    stale: bool = Field(
        False,
        description="enrolled by another model than the one served: never matched until re-enrolled",
    )

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "name": "alice",
                    "image_count": 3,
                    "model_id": "digits:1",
                    "metadata": {"team": "blue"},
                    "created_at": "2026-01-01T12:00:00+00:00",
                    "stale": False,
                }
            ]
        },
    )


class EnrollResponse(Identity):
    replaced: bool = Field(description="an identity with this name existed and was replaced")


class IdentityPage(BaseModel):
    items: list[Identity]
    total: int
    offset: int
    limit: int


class ReloadRequest(_Request):
    bundle: str | None = Field(
        None,
        description="bundle folder relative to the models folder (IDEMBED_MODELS_DIR); default: reload the "
        "current bundle path",
        examples=["default"],
    )
    force: bool = Field(
        False,
        description="reload another model even though identities enrolled by the served one would be "
        "orphaned (kept, listed as stale, never matched until re-enrolled); without it that is a 409",
    )


class ReloadResponse(BaseModel):
    model_id: str
    previous_model_id: str
    loaded_at: datetime
    warmup_ms: float
    orphaned: int = Field(0, description="identities of the previous model this (forced) reload orphaned")

    model_config = ConfigDict(protected_namespaces=())


class ReembedStatus(BaseModel):
    """A re-embedding of the gallery by a new model (a reload with IDEMBED_KEEP_ENROLLMENT_IMAGES): the old
    model serves until it is done, then both swap at once."""

    state: Literal["idle", "running", "done", "failed"] = Field(description="idle: none has run")
    model_id: str | None = Field(None, description="the model re-embedding (served once done)")
    previous_model_id: str | None = None
    total: int = Field(0, description="identities with kept images to re-embed")
    done: int = 0
    skipped: int = Field(0, description="identities whose kept images the new model could not read")
    orphaned: int = Field(0, description="identities without kept images, orphaned by the (forced) reload")
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None

    model_config = ConfigDict(protected_namespaces=())


class GalleryInfo(BaseModel):
    centers: int
    enrolled: int = Field(description="identities enrolled by the served model (the ones identify matches)")
    orphaned: int = Field(0, description="stored identities enrolled by another model: never matched")


class BatchingInfo(BaseModel):
    max_batch_size: int
    batch_wait_ms: float
    max_queue_depth: int
    queue_depth: int


class ModelInfo(BaseModel):
    model_id: str
    loaded_at: datetime
    manifest: dict[str, Any] = Field(description="the bundle's manifest.json")
    gallery: GalleryInfo
    batching: BatchingInfo

    model_config = ConfigDict(protected_namespaces=())


class Health(BaseModel):
    status: Literal["ok", "ready"]
    model_id: str | None = None

    model_config = ConfigDict(protected_namespaces=())


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable kind, e.g. invalid_image, identity_exists")
    message: str
    detail: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": {"code": "invalid_image", "message": "images[0] is empty", "detail": None}}
            ]
        }
    )


class SnapshotResponse(BaseModel):
    """The gallery snapshot just written (its manifest), for POST /v1/admin/snapshot."""

    path: str = Field(description="snapshot folder (IDEMBED_GALLERY_SNAPSHOT_PATH)")
    index_kind: Literal["hnsw", "auto"]
    identities: int = Field(description="enrolled identities in the saved index")
    cursor: int = Field(description="store change cursor the saved index reflects")
    index_file: str
    index_bytes: int
    index_sha256: str
    created_at: datetime
    write_seconds: float
