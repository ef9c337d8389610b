"""Write a bundle folder atomically and load one back, refusing anything corrupt, tampered or inconsistent."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from bundle.errors import BundleError
from bundle.manifest import (
    CENTERS_FILE,
    LABELS_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    BundleManifest,
    FileDigest,
)

# Centers are stored L2-normalised (the space the service searches); allow float32 rounding only.
_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Bundle:
    """A verified bundle in memory: every byte here matched the manifest's sha256 when it was read."""

    path: Path
    manifest: BundleManifest
    model_bytes: bytes
    centers: np.ndarray  # float32 [K, D], rows L2-normalised
    labels: list[str]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The one definition of L2 normalisation (training's TensorFlow heads use the same, training/heads/cosine.py
# `l2_normalize_tf`): the squared norm is floored at NORM_EPS, as `tf.nn.l2_normalize(x, epsilon=NORM_EPS)`
# does, so a zero vector stays zero instead of becoming NaN and a gradient through it stays bounded.
NORM_EPS = 1e-12
_NORM_FLOOR = math.sqrt(NORM_EPS)


def l2_normalize(x: np.ndarray, *, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """Vectors along the last axis scaled to unit length, `x / sqrt(max(||x||^2, NORM_EPS))`, computed in
    `dtype` (float32, as the service stores and searches; evaluation passes float64). Vectors shorter than
    1e-6 are scaled by 1e6, not to unit length."""
    x = np.asarray(x, dtype=dtype)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, _NORM_FLOOR)).astype(dtype, copy=False)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_bundle(
    directory: Path | str,
    *,
    manifest: dict[str, Any],
    model_bytes: bytes,
    centers: np.ndarray,
    labels: list[str],
) -> BundleManifest:
    """Write `model.onnx`, `centers.npy`, `labels.json` and `manifest.json` (with sha256s) to `directory`.

    `manifest` holds every manifest field except `files`, which is computed here. Centers are L2-normalised
    before writing. The folder is built beside the target and swapped in: no reader sees half a bundle.
    """
    directory = Path(directory)
    centers = l2_normalize(centers)
    payload = {
        MODEL_FILE: model_bytes,
        CENTERS_FILE: _npy_bytes(centers),
        LABELS_FILE: json.dumps(list(labels), ensure_ascii=False, indent=1).encode(),
    }
    fields = dict(manifest)
    fields["files"] = {
        name: FileDigest(sha256=sha256_bytes(data), bytes=len(data)) for name, data in payload.items()
    }
    try:
        parsed = BundleManifest.model_validate(fields)
    except ValidationError as exc:
        raise BundleError(directory / MANIFEST_FILE, f"refusing to write an invalid manifest: {exc}") from exc
    _check_consistency(directory, parsed, centers, list(labels))

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    # mkdtemp makes the folder 0700; a bundle is read by the service, often as another (non-root) user.
    staging.chmod(0o755)
    try:
        for name, data in payload.items():
            (staging / name).write_bytes(data)
        (staging / MANIFEST_FILE).write_text(parsed.model_dump_json(indent=2) + "\n")
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(staging, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return parsed


def _describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def read_manifest(directory: Path | str) -> BundleManifest:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(path, "missing (is this a bundle folder?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(path, f"not valid JSON: {exc}") from exc
    try:
        return BundleManifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(path, f"invalid manifest: {_describe_validation(exc)}") from exc


def _read_verified(directory: Path, name: str, digest: FileDigest) -> bytes:
    path = directory / name
    if Path(name).name != name or name in (".", ".."):
        raise BundleError(directory / MANIFEST_FILE, f"file name {name!r} is not a plain file name")
    if not path.is_file():
        raise BundleError(path, "missing")
    data = path.read_bytes()
    if len(data) != digest.bytes:
        raise BundleError(
            path, f"size {len(data)} bytes, manifest says {digest.bytes} (truncated or replaced)"
        )
    actual = sha256_bytes(data)
    if actual != digest.sha256:
        raise BundleError(
            path, f"sha256 mismatch: manifest says {digest.sha256}, file has {actual} (modified or corrupt)"
        )
    return data


def _parse_labels(path: Path, data: bytes) -> list[str]:
    try:
        labels = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise BundleError(path, "must be a JSON list of non-empty strings")
    if len(set(labels)) != len(labels):
        raise BundleError(path, "labels must be unique")
    return labels


def _parse_centers(path: Path, data: bytes) -> np.ndarray:
    try:
        centers = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BundleError(path, f"not a readable .npy array: {exc}") from exc
    if centers.dtype != np.float32:
        raise BundleError(path, f"dtype {centers.dtype}, expected float32")
    return centers


def _check_consistency(directory: Path, m: BundleManifest, centers: np.ndarray, labels: list[str]) -> None:
    cpath = directory / CENTERS_FILE
    expected = (m.num_classes, m.embedding.dim)
    if centers.ndim != 2 or centers.shape != expected:
        raise BundleError(
            cpath,
            f"shape {tuple(centers.shape)}, expected {expected} (manifest num_classes x embedding.dim)",
        )
    if not np.all(np.isfinite(centers)):
        raise BundleError(cpath, "contains NaN or infinite values")
    norms = np.linalg.norm(centers, axis=1)
    if np.any(np.abs(norms - 1.0) > _NORM_TOLERANCE):
        raise BundleError(cpath, "rows are not L2-normalised (the service searches in the normalised space)")
    if len(labels) != m.num_classes:
        raise BundleError(
            directory / LABELS_FILE, f"{len(labels)} labels, manifest num_classes is {m.num_classes}"
        )


def load_bundle(directory: Path | str) -> Bundle:
    """Read and verify a bundle; any problem raises `BundleError` naming the file and what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(directory, "bundle folder does not exist")
    manifest = read_manifest(directory)
    blobs = {name: _read_verified(directory, name, d) for name, d in manifest.files.items()}
    labels = _parse_labels(directory / LABELS_FILE, blobs[LABELS_FILE])
    centers = _parse_centers(directory / CENTERS_FILE, blobs[CENTERS_FILE])
    _check_consistency(directory, manifest, centers, labels)
    return Bundle(
        path=directory,
        manifest=manifest,
        model_bytes=blobs[MODEL_FILE],
        centers=centers,
        labels=labels,
    )
