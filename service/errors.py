"""Failure kinds of the service, one exception each; `service/api/errors.py` maps them to HTTP statuses once.

They carry a stable machine-readable `code`, a human `message` and optional structured `detail`, so the
plain classes (preprocess, engine, gallery) can raise them without knowing about HTTP.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    code = "error"

    def __init__(self, message: str, detail: Any = None) -> None:
        self.message = message
        self.detail = detail
        super().__init__(message)


class InvalidImageError(ServiceError):
    """Bytes that are not a decodable image (corrupt, truncated, empty, bad base64)."""

    code = "invalid_image"


class UnsupportedMediaTypeError(ServiceError):
    """A request body or image in a format the service does not take."""

    code = "unsupported_media_type"


class PayloadTooLargeError(ServiceError):
    """Request body, image pixel count or number of images over the configured limit."""

    code = "payload_too_large"


class InvalidInputError(ServiceError):
    """Well-formed request whose values are unusable: wrong embedding dim, NaN, empty batch, bad name."""

    code = "invalid_input"


class AuthenticationError(ServiceError):
    """No key, a wrong key, or no keys configured for what the request needs."""

    code = "unauthorized"


class ForbiddenError(ServiceError):
    """A valid key without the scope the request needs (read, write or admin)."""

    code = "forbidden"


class IdentityNotFoundError(ServiceError):
    code = "identity_not_found"


class IdentityConflictError(ServiceError):
    code = "identity_exists"


class NotReadyError(ServiceError):
    """No model is loaded yet, or the service is shutting down."""

    code = "not_ready"


class OverloadedError(ServiceError):
    """The inference queue is full; the client should retry after `retry_after_s`."""

    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1, detail: Any = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, detail)


class InvalidBundleError(ServiceError):
    """A hot reload named a bundle that failed validation; the current model keeps serving."""

    code = "invalid_bundle"


class ModelChangeRefusedError(ServiceError):
    """Serving another model would leave enrolled identities unmatched (their embeddings belong to the old
    model) and the change was not forced; or a bundle reuses the id of the model that enrolled them."""

    code = "model_change_refused"


class SnapshotUnavailableError(ServiceError):
    """A gallery snapshot was asked for but none can be taken: no snapshot folder set, or an exact index."""

    code = "snapshot_unavailable"


class SnapshotFailedError(ServiceError):
    """Writing the gallery snapshot failed (disk full, folder not writable); the service keeps serving."""

    code = "snapshot_failed"
