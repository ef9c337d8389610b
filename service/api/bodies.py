"""One request body, two encodings: JSON (images as base64) or multipart/form-data (images as file parts).

FastAPI binds a route's body to one content type, so routes that take both read the request here and get the
same pydantic model back either way; the OpenAPI `requestBody` for both encodings is generated from the same
models by `request_body_doc`.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.core.config import Settings
from service.errors import PayloadTooLargeError, UnsupportedMediaTypeError
from service.preprocess import decode_base64

M = TypeVar("M", bound=BaseModel)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _raise_validation(exc: ValidationError, prefix: str = "body") -> NoReturn:
    errors = [{**err, "loc": (prefix, *err["loc"])} for err in exc.errors(include_url=False)]
    raise RequestValidationError(errors) from exc


async def read_body(
    request: Request,
    model: type[M],
    settings: Settings,
    *,
    file_fields: dict[str, str],
    json_fields: tuple[str, ...] = (),
) -> tuple[M, dict[str, list[bytes]]]:
    """Parse JSON or multipart into `model`; returns it and the image bytes of each image field.

    `file_fields` maps multipart part names to the model field they fill (e.g. `image` -> `images`). For JSON,
    the base64 strings of those model fields are decoded here, so routes only ever see bytes. `json_fields`
    are multipart text fields holding JSON (e.g. enrollment metadata).
    """
    media = _media_type(request)
    if media == "application/json" or media.endswith("+json"):
        body = await request.body()
        try:
            parsed = model.model_validate_json(body)
        except ValidationError as exc:
            _raise_validation(exc)
        images: dict[str, list[bytes]] = {}
        for target in set(file_fields.values()):
            value = getattr(parsed, target)
            if value is None:
                continue
            items = value if isinstance(value, list) else [value]
            check_count(len(items), settings)
            names = [f"{target}[{i}]" for i in range(len(items))] if isinstance(value, list) else [target]
            images[target] = [
                decode_base64(text, where=name) for name, text in zip(names, items, strict=True)
            ]
        return parsed, images
    if media == "multipart/form-data":
        return await _read_form(request, model, settings, file_fields, json_fields)
    raise UnsupportedMediaTypeError(
        f"content type {media or '(none)'!r} is not accepted; send application/json or multipart/form-data",
        detail={"accepted": ["application/json", "multipart/form-data"]},
    )


async def read_optional_json(request: Request, model: type[M]) -> M:
    """A JSON body that may be absent (then the model's defaults); malformed JSON is a 422 like elsewhere."""
    body = await request.body()
    if not body.strip():
        return model()
    media = _media_type(request)
    if media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaTypeError(f"content type {media!r} is not accepted; send application/json")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        _raise_validation(exc)


def json_body_doc(model: type[BaseModel], *, required: bool) -> dict[str, Any]:
    """OpenAPI `requestBody` for a route that reads its JSON body itself."""
    schema = model.model_json_schema()
    if "$defs" in schema:
        raise ValueError(f"{model.__name__} must be flat to be inlined in the OpenAPI request body")
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}


async def _read_form(
    request: Request,
    model: type[M],
    settings: Settings,
    file_fields: dict[str, str],
    json_fields: tuple[str, ...],
) -> tuple[M, dict[str, list[bytes]]]:
    limit = settings.max_images_per_request
    # Starlette's own part limit (a 400) is set above ours so that too many images is reported as a 413.
    async with request.form(max_files=limit * 2 + 2, max_fields=64) as form:
        fields: dict[str, Any] = {}
        images: dict[str, list[bytes]] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                target = file_fields.get(key)
                if target is None:
                    raise UnsupportedMediaTypeError(
                        f"unexpected file part {key!r}; image parts are named {sorted(file_fields)}"
                    )
                blobs = images.setdefault(target, [])
                check_count(len(blobs) + 1, settings)
                blobs.append(await value.read())
            elif key in file_fields:
                # A text part under an image name: curl -F image=abc (no @) sends the text itself.
                raise UnsupportedMediaTypeError(
                    f"part {key!r} must be a file upload (curl -F {key}=@file.png)"
                )
            elif key in json_fields:
                try:
                    fields[key] = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise RequestValidationError(
                        [{"loc": ("body", key), "msg": f"not valid JSON: {exc}", "type": "json_invalid"}]
                    ) from exc
            else:
                fields[key] = value
    # Placeholders satisfy "images or embeddings" validation; routes use the bytes in `images`.
    lists = list_fields(model)
    for target, blobs in images.items():
        if target not in lists and len(blobs) > 1:
            raise RequestValidationError(
                [{"loc": ("body", target), "msg": "give one file, not several", "type": "too_long"}]
            )
        fields[target] = ["-"] * len(blobs) if target in lists else "-"
    try:
        parsed = model.model_validate(fields)
    except ValidationError as exc:
        _raise_validation(exc)
    return parsed, images


def check_count(count: int, settings: Settings, what: str = "images") -> None:
    if count > settings.max_images_per_request:
        raise PayloadTooLargeError(
            f"{count} {what} in one request, over the limit of {settings.max_images_per_request} "
            "(IDEMBED_MAX_IMAGES_PER_REQUEST)",
            detail={"count": count, "max_images_per_request": settings.max_images_per_request},
        )


def list_fields(model: type[BaseModel]) -> set[str]:
    """Fields whose JSON schema is an array (possibly nullable): they take several file parts."""
    out = set()
    for name, prop in model.model_json_schema()["properties"].items():
        alternatives = [prop, *prop.get("anyOf", [])]
        if any(alt.get("type") == "array" for alt in alternatives):
            out.add(name)
    return out


def request_body_doc(
    model: type[BaseModel], file_fields: dict[str, str], *, required_files: tuple[str, ...] = ()
) -> dict[str, Any]:
    """OpenAPI `requestBody` offering both encodings, derived from the JSON model."""
    schema = model.model_json_schema()
    if "$defs" in schema:
        raise ValueError(f"{model.__name__} must be flat to be inlined in the OpenAPI request body")
    form_props: dict[str, Any] = {}
    for name, prop in schema["properties"].items():
        if name in file_fields.values():
            continue
        form_props[name] = prop
    lists = list_fields(model)
    for part, target in file_fields.items():
        binary = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
        form_props[part] = {"type": "array", "items": binary} if target in lists else binary
    form_schema: dict[str, Any] = {"type": "object", "properties": form_props}
    required = [r for r in schema.get("required", []) if r not in file_fields.values()] + list(required_files)
    if required:
        form_schema["required"] = required
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {"schema": form_schema},
            },
        }
    }
