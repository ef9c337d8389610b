"""A real, tiny ONNX bundle for service tests: a fixed linear projection of 8x8 digit images to 16-d.

Built with onnx.helper (no TensorFlow) and written with `bundle.write_bundle`, so the service loads it
through exactly the path it uses for a trained bundle. Centers are the normalised class means of the digits
0-7 ("identities" seen in training); 8 and 9 play unseen identities for enrollment tests.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from bundle import write_bundle
from bundle.files import l2_normalize
from bundle.manifest import InputSpec, Preprocessing
from bundle.preprocess import preprocess_pil

DIM = 16
SIDE = 8
TRAIN_CLASSES = [str(d) for d in range(8)]


def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled digits as uint8 images [n, 8, 8] (0..255) and int labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images * (255.0 / 16.0)).round().astype(np.uint8), data.target.astype(np.int64)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def onnx_model(weights: np.ndarray, bias: np.ndarray, *, output_name: str = "embedding") -> bytes:
    """input [N, 8, 8, 1] -> Flatten -> MatMul -> Add -> output [N, DIM]."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["proj"]),
            helper.make_node("Add", ["proj", "b"], [output_name]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", SIDE, SIDE, 1])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", weights.shape[1]])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def manifest_fields(
    *, version: str = "1", dim: int = DIM, num_classes: int = len(TRAIN_CLASSES), threshold: float = 0.8
) -> dict:
    return {
        "name": "tiny-digits",
        "version": version,
        "created_at": "2026-01-01T00:00:00+00:00",
        "input": {"name": "input", "layout": "NHWC", "height": SIDE, "width": SIDE, "channels": 1},
        "preprocessing": {
            "color_mode": "L",
            "resample": "bilinear",
            "scale": 1 / 255,
            "mean": [0.5],
            "std": [0.5],
        },
        "embedding": {"output_name": "embedding", "dim": dim},
        "num_classes": num_classes,
        "thresholds": {
            "default": threshold,
            "target_far": 0.01,
            "at_target_far": {"threshold": threshold, "far": 0.01, "tar": 0.9},
            "eer": {"threshold": 0.7, "far": 0.05, "tar": 0.95},
            "num_genuine_pairs": 100,
            "num_impostor_pairs": 100,
        },
        "training": {
            "backbone": "linear",
            "center_update": "none",
            "center_lambda": 0.0,
            "center_alpha": 0.5,
            "epochs": 1,
            "batch_size": 1,
            "seed": 0,
            "dataset": "sklearn-digits",
            "train_classes": TRAIN_CLASSES,
            "heldout_classes": ["8", "9"],
            "val_fraction": 0.0,
        },
    }


def embed_reference(images: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """What the service must return for these images: shared preprocessing + the same linear map in numpy."""
    fields = manifest_fields()
    pre, spec = Preprocessing(**fields["preprocessing"]), InputSpec(**fields["input"])
    x = np.stack([preprocess_pil(Image.fromarray(im), pre, spec) for im in images]).reshape(len(images), -1)
    return l2_normalize(x @ weights + bias)


def build(
    directory: Path, *, seed: int = 0, version: str = "1", threshold: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Write the tiny bundle to `directory`; returns (weights, bias) so tests can compute references.
    The same seed gives the same model; `threshold` is its calibrated one (a recalibration)."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(SIDE * SIDE, DIM)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=DIM).astype(np.float32)
    images, labels = digits()
    feats = embed_reference(images, weights, bias)
    centers = np.stack([feats[labels == int(c)].mean(axis=0) for c in TRAIN_CLASSES])
    write_bundle(
        directory,
        manifest=manifest_fields(version=version, threshold=threshold),
        model_bytes=onnx_model(weights, bias),
        centers=centers,
        labels=TRAIN_CLASSES,
    )
    return weights, bias
