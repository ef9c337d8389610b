"""Durable storage of enrolled identities: the contract (`base`), its backends and `open_store`.

`open_store(url, dim)` picks the backend from the URL, so nothing outside this package names a backend:
`sqlite:///path/file.db` (or a bare path, the default, `sqlite.py`) or `postgresql://...` (`postgres.py`,
imported only when asked for, so the default install needs no database driver).
"""

from __future__ import annotations

from service.gallery.store.base import (
    KEYSET_START,
    ChangeBatch,
    ChangeFeedStore,
    ChangeWaiter,
    EnrolledIdentity,
    FeedPrunedError,
    IdentityExistsError,
    IdentityStore,
    ModelHistory,
    ServedModel,
    StoreError,
    check_embedding,
)
from service.gallery.store.sqlite import SQLiteIdentityStore

__all__ = [
    "KEYSET_START",
    "ChangeBatch",
    "ChangeFeedStore",
    "ChangeWaiter",
    "EnrolledIdentity",
    "FeedPrunedError",
    "IdentityExistsError",
    "IdentityStore",
    "ModelHistory",
    "SQLiteIdentityStore",
    "ServedModel",
    "StoreError",
    "check_embedding",
    "open_store",
    "store_location",
]


def store_location(url: str) -> str:
    """The store a URL names, without credentials (for logs and messages)."""
    return url.split("@")[-1]


def open_store(url: str, dim: int) -> IdentityStore:
    """Open the store a URL names: `sqlite:///path/to/file.db` (or a bare path) or `postgresql://...`."""
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from service.gallery.store.postgres import PostgresIdentityStore
        except ImportError as exc:
            raise StoreError(
                f"store URL {store_location(url)!r} needs PostgreSQL support: pip install '.[pg]' ({exc})"
            ) from exc
        return PostgresIdentityStore(url, dim)
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if "://" in path:
        raise StoreError(f"unsupported store URL scheme in {url!r}; use sqlite:///path or postgresql://...")
    return SQLiteIdentityStore(path, dim)
