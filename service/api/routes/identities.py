"""/v1/identities: enroll (from images or embeddings), list with paging, get and delete identities."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from service.api.bodies import check_count, read_body, request_body_doc
from service.api.deps import RuntimeDep, SettingsDep, audited, require_read_key, require_write_key
from service.api.errors import error_responses
from service.api.schemas import EnrollRequest, EnrollResponse, Identity, IdentityPage
from service.errors import IdentityConflictError, IdentityNotFoundError
from service.gallery.store import EnrolledIdentity, IdentityExistsError

router = APIRouter(prefix="/v1/identities", tags=["identities"])

FILES = {"images": "images", "image": "images"}
NameParam = Annotated[str, Path(description="the identity's name (URL-encoded)", max_length=512)]


def to_schema(record: EnrolledIdentity, served_model_id: str) -> Identity:
    return Identity(
        name=record.name,
        image_count=record.image_count,
        model_id=record.model_id,
        metadata=record.metadata,
        created_at=record.created_at,
        stale=record.model_id != served_model_id,
    )


@router.post(
    "",
    status_code=201,
    response_model=EnrollResponse,
    summary="Enroll an identity",
    description="Its template is the normalised mean embedding of the given images (or embeddings). "
    "Multipart: `name`, one or more `images` file parts, optional `metadata` (a JSON object) and `replace`. "
    "The identity is durable once this returns 201.",
    dependencies=[Depends(require_write_key)],
    openapi_extra=request_body_doc(EnrollRequest, FILES),
    responses=error_responses(400, 401, 409, 413, 415, 422, 503),
)
async def enroll(request: Request, runtime: RuntimeDep, settings: SettingsDep) -> EnrollResponse:
    body, files = await read_body(
        request, EnrollRequest, settings, file_fields=FILES, json_fields=("metadata",)
    )
    if body.embeddings is not None:
        check_count(len(body.embeddings), settings, "embeddings")
    async with audited(request, "enroll", body.name, 201) as audit_detail:
        try:
            record, replaced = await runtime.enroll(
                body.name,
                files.get("images"),
                body.embeddings,
                metadata=dict(body.metadata),
                replace=body.replace,
            )
        except IdentityExistsError as exc:
            raise IdentityConflictError(
                f"identity {body.name!r} is already enrolled; send replace=true to overwrite it",
                detail={"name": body.name},
            ) from exc
        audit_detail["replaced"] = replaced
    return EnrollResponse(**to_schema(record, record.model_id).model_dump(), replaced=replaced)


@router.get(
    "",
    response_model=IdentityPage,
    summary="List enrolled identities",
    description="In enrollment order; page with `offset` and `limit`. `stale: true` marks identities another "
    "model enrolled (orphaned by a model change): they are kept but never matched until re-enrolled.",
    dependencies=[Depends(require_read_key)],
    responses=error_responses(401, 422, 503),
)
async def list_identities(
    runtime: RuntimeDep,
    offset: Annotated[int, Query(ge=0, le=2**53)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> IdentityPage:
    records, total = await runtime.galleries.page(offset, limit)
    served = runtime.current.model_id
    items = [to_schema(r, served) for r in records]
    return IdentityPage(items=items, total=total, offset=offset, limit=limit)


@router.get(
    "/{name}",
    response_model=Identity,
    summary="Get one enrolled identity",
    dependencies=[Depends(require_read_key)],
    responses=error_responses(401, 404, 422, 503),
)
async def get_identity(name: NameParam, runtime: RuntimeDep) -> Identity:
    record = await runtime.galleries.get(name)
    if record is None:
        raise IdentityNotFoundError(f"no identity named {name!r} is enrolled", detail={"name": name})
    return to_schema(record, runtime.current.model_id)


@router.delete(
    "/{name}",
    status_code=204,
    response_class=Response,
    summary="Delete an enrolled identity",
    dependencies=[Depends(require_write_key)],
    responses=error_responses(401, 404, 422, 503),
)
async def delete_identity(name: NameParam, request: Request, runtime: RuntimeDep) -> Response:
    async with audited(request, "delete", name, 204):
        record = await runtime.galleries.delete(name)
        if record is None:
            raise IdentityNotFoundError(f"no identity named {name!r} is enrolled", detail={"name": name})
    return Response(status_code=204)
