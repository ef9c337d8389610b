"""Tiny real bundles for the reliability suite, and the faulty variants operators actually meet.

The model is a seeded linear projection of an 8x8 grayscale image to 16-d, built by `tiny_bundle`
(onnx.helper, no TensorFlow) and written through `bundle.write_bundle`, so the service loads it exactly as a
trained bundle.
The faults are made the way they happen in practice: a file edited after export (tampered), a copy cut
short (truncated), and files from two different exports mixed in one folder (mismatched).
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np

from bundle import write_bundle
from bundle.manifest import CENTERS_FILE, MANIFEST_FILE, MODEL_FILE
from testkit import tiny_bundle

SIDE = tiny_bundle.SIDE
DIM = 16
LABELS = ["ada", "grace", "alan", "edsger"]


def onnx_linear(dim: int, seed: int, hidden_layers: int = 0, hidden: int = 1024) -> bytes:
    """input [N, 8, 8, 1] -> Flatten -> (MatMul [., hidden] -> Relu) x hidden_layers -> MatMul -> [N, dim].

    Hidden layers only make inference slow on purpose (the overload tests need a queue that fills up).
    """
    rng = np.random.default_rng(seed)
    sizes = [SIDE * SIDE] + [hidden] * hidden_layers + [dim]
    weights = [
        (rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        for fan_in, fan_out in itertools.pairwise(sizes)
    ]
    return tiny_bundle.layered_model(weights, name="reliability-mlp")


def manifest_fields(version: str, dim: int) -> dict:
    return tiny_bundle.manifest_fields(
        version=version,
        dim=dim,
        num_classes=len(LABELS),
        threshold=0.5,
        name="reliability",
        train_classes=LABELS,
        heldout_classes=(),
        eer_threshold=0.4,
        pairs=10,
        dataset="synthetic",
    )


def write_good(
    directory: Path, *, version: str = "1", dim: int = DIM, seed: int = 0, hidden_layers: int = 0
) -> Path:
    """A valid bundle; `version` and `seed` make distinct models, `dim` a different embedding size."""
    centers = np.random.default_rng(seed + 1).normal(size=(len(LABELS), dim)).astype(np.float32)
    write_bundle(
        directory,
        manifest=manifest_fields(version, dim),
        model_bytes=onnx_linear(dim, seed, hidden_layers),
        centers=centers,
        labels=LABELS,
    )
    return directory


def write_tampered(directory: Path) -> Path:
    """A good bundle whose model.onnx had bytes changed after export (same size, different sha256)."""
    write_good(directory)
    path = directory / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return directory


def write_truncated(directory: Path) -> Path:
    """A good bundle whose model.onnx was cut short, as by an interrupted copy."""
    write_good(directory)
    path = directory / MODEL_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return directory


def write_mismatched(directory: Path, scratch: Path) -> Path:
    """Model and manifest from a 16-d export, centers.npy from an 8-d one, re-hashed so checksums pass.

    Re-hashing is what someone "fixing" a checksum error by hand does; the shape check must still catch it.
    """
    write_good(directory, dim=DIM)
    other = write_good(scratch / "other-export", dim=DIM // 2)
    shutil.copyfile(other / CENTERS_FILE, directory / CENTERS_FILE)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["files"][CENTERS_FILE] = json.loads((other / MANIFEST_FILE).read_text())["files"][CENTERS_FILE]
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return directory
