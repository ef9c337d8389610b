"""A real, tiny ONNX bundle for tests: a fixed linear projection of 8x8 digit images to 16-d.

The one tiny-bundle builder of the tests (fault_bundles.py makes its variants from it). Built with
onnx.helper (no TensorFlow) and written with `bundle.write_bundle`, so the service loads it through exactly
the path it uses for a trained bundle. Centers are the normalised class means of the digits
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


def layered_model(
    weights: list[np.ndarray],
    bias: np.ndarray | None = None,
    *,
    output_name: str = "embedding",
    name: str = "tiny",
) -> bytes:
    """input [N, 8, 8, 1] -> Flatten -> (MatMul W_i -> Relu) per hidden W_i -> MatMul W_last (-> Add bias)
    -> output [N, W_last.shape[1]]: the one graph builder of the tiny test bundles."""
    nodes = [helper.make_node("Flatten", ["input"], ["x0"], axis=1)]
    inits = []
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(np.asarray(w, np.float32), f"W{i}"))
        last = i == len(weights) - 1
        out = (output_name if bias is None else "proj") if last else f"h{i}"
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"W{i}"], [out]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"x{i + 1}"]))
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, np.float32), "b"))
        nodes.append(helper.make_node("Add", ["proj", "b"], [output_name]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", SIDE, SIDE, 1])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", weights[-1].shape[1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def onnx_model(weights: np.ndarray, bias: np.ndarray, *, output_name: str = "embedding") -> bytes:
    """input [N, 8, 8, 1] -> Flatten -> MatMul -> Add -> output [N, DIM]."""
    return layered_model([weights], bias, output_name=output_name)


def manifest_fields(
    *,
    version: str = "1",
    dim: int = DIM,
    num_classes: int = len(TRAIN_CLASSES),
    threshold: float = 0.8,
    name: str = "tiny-digits",
    train_classes: list[str] = TRAIN_CLASSES,
    heldout_classes: tuple[str, ...] = ("8", "9"),
    eer_threshold: float = 0.7,
    pairs: int = 100,
    dataset: str = "sklearn-digits",
) -> dict:
    return {
        "name": name,
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
            "eer": {"threshold": eer_threshold, "far": 0.05, "tar": 0.95},
            "num_genuine_pairs": pairs,
            "num_impostor_pairs": pairs,
        },
        "training": {
            "backbone": "linear",
            "center_update": "none",
            "center_lambda": 0.0,
            "center_alpha": 0.5,
            "epochs": 1,
            "batch_size": 1,
            "seed": 0,
            "dataset": dataset,
            "train_classes": list(train_classes),
            "heldout_classes": list(heldout_classes),
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
