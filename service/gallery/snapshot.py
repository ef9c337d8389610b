"""Gallery snapshots: the enrolled-identity index saved with a manifest, so that a large gallery starts by
loading its graph and replaying the store's changes since, instead of re-inserting every identity (34 min at
1M x 128-d on our 2-core machine; loading the snapshot takes seconds, docs/performance.md "Gallery index").

A snapshot is a cache; the store stays the truth. `open_gallery` uses one only if its manifest fits (format,
dim, index kind and graph options, store id, a cursor the store's change feed still covers), the index file
matches its checksum and, after the changes since the cursor, the index holds exactly the store's keys.
Anything else is logged as a warning naming the file, and the index is rebuilt from the store as without a
snapshot. Only graph indexes (hnsw, auto) are saved: an exact index rebuilds from the store in seconds.

Folder layout: `manifest.json` names `index-<sha256 prefix>.usearch`. A save writes the new index file under
its content hash first and then replaces the manifest (temp file + `os.replace`), so a crash at any point
leaves a manifest naming an intact index file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.gallery.ann import AutoIndex, HnswIndex
from service.gallery.enrolled import EnrolledIndex
from service.gallery.gallery import Gallery, IndexFactory
from service.gallery.index import VectorIndex
from service.gallery.store import ChangeFeedStore, FeedPrunedError, IdentityStore

log = logging.getLogger("idembed.gallery.snapshot")

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_INDEX_PREFIX = "index-"
_INDEX_SUFFIX = ".usearch"

SnapshotIndex = HnswIndex | AutoIndex


class SnapshotManifest(BaseModel):
    """What a snapshot holds and what it was taken from; every field is checked before the index is used."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int
    dim: int = Field(ge=1)
    index_kind: Literal["hnsw", "auto"]
    graph_options: dict[str, int | str] = Field(description="options the saved graph depends on")
    identities: int = Field(ge=0, description="vectors in the index file")
    cursor: int = Field(ge=0, description="store change cursor the index reflects")
    store_id: str
    # The model whose identities the index holds (None: written before galleries were bound to a model).
    model_id: str | None = None
    index_file: str = Field(pattern=r"^index-[0-9a-f]{16}\.usearch$")
    index_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    index_bytes: int = Field(ge=0)
    created_at: datetime
    write_seconds: float


class SnapshotError(Exception):
    """A snapshot cannot be written (no graph index, or the folder is not writable)."""


class NotSnapshotted(SnapshotError):
    """The index is exact: it is rebuilt from the store, never snapshotted."""


EXACT_NOT_SNAPSHOTTED = (
    "an exact index rebuilds from the store in seconds, so it is not snapshotted; snapshots are for "
    "IDEMBED_GALLERY_INDEX=hnsw or auto"
)


def snapshots_index(kind: str) -> bool:
    """Whether an index of this kind (IDEMBED_GALLERY_INDEX) is snapshotted: graphs are, exact is not."""
    return kind != "exact"


class SnapshotRefused(Exception):
    """A snapshot exists (or was looked for) but does not fit this store and configuration."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class GalleryStart:
    """How the gallery was built: from a snapshot (with `replayed` changes) or from the store."""

    gallery: Gallery
    cursor: int | None  # store change cursor the index reflects (None: the store has no change feed)
    source: Literal["snapshot", "store"]
    replayed: int = 0
    refused: str | None = None  # why a configured snapshot was not used


def index_kind(index: VectorIndex) -> Literal["hnsw", "auto"]:
    """The snapshot kind of a graph index; `NotSnapshotted` for any other index."""
    if isinstance(index, AutoIndex):
        return "auto"
    if isinstance(index, HnswIndex):
        return "hnsw"
    raise NotSnapshotted(EXACT_NOT_SNAPSHOTTED)


def file_sha256(path: Path) -> tuple[str, int]:
    """(hex sha256, size in bytes), read in 8 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale(directory: Path, keep: str) -> None:
    """Index files no manifest names any more, and temp files of interrupted saves."""
    for path in directory.iterdir():
        stale_index = path.name.startswith(_INDEX_PREFIX) and path.name.endswith(_INDEX_SUFFIX)
        if (stale_index and path.name != keep) or (path.name.startswith(".") and path.name.endswith(".tmp")):
            path.unlink(missing_ok=True)


def save_snapshot(directory: Path, gallery: Gallery, cursor_of: Callable[[], int]) -> SnapshotManifest:
    """Write the gallery's enrolled index and its manifest into `directory`; returns the manifest.

    `cursor_of` gives the store change cursor the index reflects; it is called with enrollments held off,
    while the index is written, so index and cursor belong together.
    """
    started = time.perf_counter()
    store_id = gallery.store.store_id()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{_INDEX_PREFIX}{uuid.uuid4().hex}.tmp"
        try:
            with gallery.frozen() as index:
                kind = index_kind(index)
                assert isinstance(index, HnswIndex | AutoIndex)
                cursor, count, options = cursor_of(), len(index), index.graph_options()
                index.save(tmp)
            _fsync(tmp)
            sha, size = file_sha256(tmp)
            index_file = f"{_INDEX_PREFIX}{sha[:16]}{_INDEX_SUFFIX}"
            os.replace(tmp, directory / index_file)
        finally:
            tmp.unlink(missing_ok=True)
        manifest = SnapshotManifest(
            format_version=FORMAT_VERSION,
            dim=gallery.dim,
            index_kind=kind,
            graph_options=options,  # type: ignore[arg-type]
            identities=count,
            cursor=cursor,
            store_id=store_id,
            model_id=gallery.model_id,
            index_file=index_file,
            index_sha256=sha,
            index_bytes=size,
            created_at=datetime.now(UTC),
            write_seconds=round(time.perf_counter() - started, 3),
        )
        _write_atomically(directory / MANIFEST_NAME, manifest.model_dump_json(indent=2) + "\n")
        _fsync(directory)
        _remove_stale(directory, keep=index_file)
    except OSError as exc:
        raise SnapshotError(f"cannot write gallery snapshot into {directory}: {exc}") from exc
    return manifest


def read_manifest(directory: Path) -> SnapshotManifest:
    path = directory / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SnapshotRefused(path, "no snapshot there yet") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotRefused(path, f"unreadable ({exc})") from exc
    try:
        return SnapshotManifest.model_validate_json(text)
    except ValidationError as exc:
        raise SnapshotRefused(
            path, f"not a valid snapshot manifest ({exc.error_count()} errors: {exc})"
        ) from exc


def _check_fits(
    manifest: SnapshotManifest,
    path: Path,
    probe: SnapshotIndex,
    store: IdentityStore,
    store_cursor: int,
    model_id: str | None,
) -> None:
    """Refuse a manifest that belongs to another format, configuration or store."""
    kind = index_kind(probe)  # the caller checked that it is a graph index
    expected: list[tuple[str, object, object]] = [
        ("format version", manifest.format_version, FORMAT_VERSION),
        ("embedding dim", manifest.dim, store.dim),
        ("index kind (IDEMBED_GALLERY_INDEX)", manifest.index_kind, kind),
        ("index graph options", manifest.graph_options, probe.graph_options()),
        ("store id (a snapshot of another database)", manifest.store_id, store.store_id()),
    ]
    if manifest.model_id is not None and model_id is not None:
        # Its vectors are another model's embeddings: never to be searched with this model's queries.
        expected.append(("model (whose identities it holds)", manifest.model_id, model_id))
    for what, found, wanted in expected:
        if found != wanted:
            raise SnapshotRefused(path, f"{what} is {found!r}, this service has {wanted!r}")
    if manifest.cursor > store_cursor:
        raise SnapshotRefused(
            path,
            f"taken at change {manifest.cursor}, but the store's newest change is {store_cursor} "
            "(was the store restored from an older backup?)",
        )


def _load_index(manifest: SnapshotManifest, directory: Path, probe: SnapshotIndex) -> SnapshotIndex:
    path = directory / manifest.index_file
    try:
        sha, size = file_sha256(path)
    except OSError as exc:
        raise SnapshotRefused(path, f"index file unreadable ({exc})") from exc
    if size != manifest.index_bytes or sha != manifest.index_sha256:
        raise SnapshotRefused(
            path, f"index file is damaged: {size} bytes, sha256 {sha[:16]}... differ from the manifest"
        )
    try:
        index = probe.restored(path)
    except (ValueError, RuntimeError, OSError) as exc:
        raise SnapshotRefused(path, f"usearch cannot load it ({exc})") from exc
    if len(index) != manifest.identities:
        raise SnapshotRefused(path, f"holds {len(index)} vectors, the manifest says {manifest.identities}")
    return index


def _names_for(
    index: SnapshotIndex, store: IdentityStore, batch_size: int, model_id: str | None
) -> dict[int, str]:
    """Key -> name from the store (identities `model_id` enrolled); a restored auto index still on exact
    search also gets its f32 vectors."""
    if not (isinstance(index, AutoIndex) and index.needs_exact_fill):
        return store.names_by_key(model_id)
    names: dict[int, str] = {}
    for records in store.iter_all(batch_size):
        batch = [r for r in records if model_id is None or r.model_id == model_id]
        if not batch:
            continue
        keys = np.array([r.key for r in batch], dtype=np.int64)
        index.fill_exact(keys, np.stack([r.embedding for r in batch]))
        names.update((r.key, r.name) for r in batch)
    return names


def _replay(enrolled: EnrolledIndex, store: ChangeFeedStore, cursor: int, path: Path) -> tuple[int, int]:
    """Apply the store's changes after `cursor` to the index; returns (new cursor, changes applied)."""
    applied = 0
    while True:
        try:
            batch = store.changes_since(cursor)
        except FeedPrunedError as exc:
            raise SnapshotRefused(path, f"cannot catch up from change {cursor}: {exc}") from exc
        if batch.cursor == cursor:
            return cursor, applied
        enrolled.apply(batch.upserts, batch.deleted)
        applied += len(batch.upserts) + len(batch.deleted)
        cursor = batch.cursor


def _check_keys(enrolled: EnrolledIndex, path: Path) -> None:
    """Last line of defence: every indexed key is a stored identity and every stored identity is indexed."""
    assert isinstance(enrolled.index, HnswIndex | AutoIndex)
    indexed = enrolled.index.keys()
    names = enrolled.names
    stored = np.fromiter(names.keys(), dtype=np.int64, count=len(names))
    unknown = np.setdiff1d(indexed, stored, assume_unique=True)
    missing = np.setdiff1d(stored, indexed, assume_unique=True)
    if len(unknown) or len(missing):
        raise SnapshotRefused(
            path,
            f"after replaying the store's changes the index has {len(unknown)} keys the store does not and "
            f"lacks {len(missing)} it has (e.g. {[*unknown[:3].tolist(), *missing[:3].tolist()]})",
        )


def restore_gallery(
    directory: Path,
    centers: np.ndarray,
    labels: list[str],
    store: IdentityStore,
    *,
    index_factory: IndexFactory,
    load_batch_size: int = 10_000,
    model_id: str | None = None,
) -> GalleryStart:
    """A gallery from the snapshot in `directory`, brought up to date with the store; `SnapshotRefused` if
    anything does not fit (the caller then rebuilds from the store)."""
    manifest_path = directory / MANIFEST_NAME
    probe = index_factory(store.dim)
    try:
        index_kind(probe)
    except NotSnapshotted as exc:
        raise SnapshotRefused(manifest_path, str(exc)) from exc
    assert isinstance(probe, HnswIndex | AutoIndex)
    if not isinstance(store, ChangeFeedStore):
        raise SnapshotRefused(
            manifest_path, f"the store ({type(store).__name__}) has no change feed to catch up"
        )
    manifest = read_manifest(directory)
    _check_fits(manifest, manifest_path, probe, store, store.change_cursor(), model_id)
    index = _load_index(manifest, directory, probe)
    enrolled = EnrolledIndex(index, _names_for(index, store, load_batch_size, model_id), model_id=model_id)
    cursor, replayed = _replay(enrolled, store, manifest.cursor, manifest_path)
    _check_keys(enrolled, manifest_path)
    gallery = Gallery.with_index(centers, labels, store, index, enrolled.names, model_id=model_id)
    return GalleryStart(gallery, cursor, "snapshot", replayed=replayed)


def open_gallery(
    snapshot_dir: Path | None,
    centers: np.ndarray,
    labels: list[str],
    store: IdentityStore,
    *,
    index_factory: IndexFactory,
    load_batch_size: int = 10_000,
    model_id: str | None = None,
) -> GalleryStart:
    """The gallery from the snapshot if one fits, else rebuilt from the store (with a warning saying why)."""
    refused: str | None = None
    if snapshot_dir is not None:
        started = time.perf_counter()
        try:
            start = restore_gallery(
                snapshot_dir,
                centers,
                labels,
                store,
                index_factory=index_factory,
                load_batch_size=load_batch_size,
                model_id=model_id,
            )
        except SnapshotRefused as exc:
            refused = str(exc)
            log.warning("gallery snapshot not used, rebuilding the index from the store: %s", exc)
        else:
            log.info(
                "gallery loaded from snapshot %s: %d identities, %d changes replayed, %.2f s",
                snapshot_dir,
                start.gallery.num_enrolled,
                start.replayed,
                time.perf_counter() - started,
            )
            return start
    # Cursor first: a write landing while the index is built is replayed again (idempotent), never missed.
    cursor = store.change_cursor() if isinstance(store, ChangeFeedStore) else None
    gallery = Gallery(
        centers,
        labels,
        store,
        model_id=model_id,
        index_factory=index_factory,
        load_batch_size=load_batch_size,
    )
    return GalleryStart(gallery, cursor, "store", refused=refused)
