"""Keras embedding model -> ONNX (tf2onnx, dynamic batch) verified against Keras, then written as a bundle.

The export refuses to produce a bundle whose ONNX graph disagrees with the Keras model: a parity check runs
both on a real batch and fails with `ExportParityError` above the tolerance (1e-4 by default).
"""

from __future__ import annotations

import platform
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx

from bundle.files import write_bundle
from bundle.manifest import BundleManifest, InputSpec, Preprocessing, Thresholds, TrainingRecipe
from training.config import PARITY_TOLERANCE

if TYPE_CHECKING:
    from collections.abc import Callable

    from training.quantize import Quantized

MIN_OPSET = 17
DEFAULT_OPSET = 17
BATCH_DIM = "batch"
_OTHER_TOOLS = ("scikit-learn", "pydantic", "Pillow")


class ExportError(RuntimeError):
    """The model cannot be exported as a bundle; the message says which check failed."""


class ExportParityError(ExportError):
    """ONNX and Keras embeddings of the same batch differ by more than the tolerance."""

    def __init__(self, max_abs_diff: float, tolerance: float, batch_size: int) -> None:
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        super().__init__(
            f"parity check failed: max |keras - onnxruntime| = {max_abs_diff:.3g} on a batch of "
            f"{batch_size} exceeds the tolerance {tolerance:.1g}; the ONNX graph does not compute what the "
            "Keras model does (no bundle written)"
        )


def tool_versions() -> dict[str, str]:
    """Versions of everything that shaped the exported numbers, recorded in the manifest."""
    # Module versions rather than distribution names: TensorFlow ships as tensorflow or tensorflow-cpu.
    versions = {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }
    for dist in _OTHER_TOOLS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _check_model_input(model: keras.Model, input_spec: InputSpec) -> None:
    expected = input_spec.shape(None)[1:]
    actual = tuple(model.input_shape[1:])
    if actual != expected:
        raise ExportError(
            f"model input shape {actual} does not match the manifest input "
            f"{input_spec.layout} {expected} (input.height/width/channels/layout)"
        )


def _rename_io(proto: onnx.ModelProto, input_name: str, output_name: str) -> None:
    """Give the graph the manifest's input/output names and a named dynamic batch axis.

    tf2onnx names the output after the last Keras layer; the service looks it up by the manifest's
    `embedding.output_name`, so the graph must use exactly that name whatever the layer was called.
    """
    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ExportError(
            f"the embedding model must have one input and one output, "
            f"got {len(graph.input)} and {len(graph.output)}"
        )
    renames = {graph.input[0].name: input_name, graph.output[0].name: output_name}
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    graph.input[0].name = input_name
    graph.output[0].name = output_name
    for value in (graph.input[0], graph.output[0]):
        dim0 = value.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_value")
        dim0.dim_param = BATCH_DIM


_GENERATED = re.compile(r"^(.*?)__\d+$")


def _canonical_names(proto: onnx.ModelProto) -> None:
    """Renumber tf2onnx's generated names (`new_shape__111`) in graph order, so the bytes do not depend on
    how many names tf2onnx made earlier in the process: two exports of one model are byte-identical (a
    rebuilt bundle leaves git clean; tested across processes)."""
    graph = proto.graph
    keep = {v.name for v in (*graph.input, *graph.output)}
    taken = keep | {
        n
        for n in (*[i.name for i in graph.initializer], *[o for nd in graph.node for o in nd.output])
        if not _GENERATED.match(n)
    }
    mapping: dict[str, str] = {}
    counter = 0

    def canonical(name: str) -> str:
        nonlocal counter
        match = _GENERATED.match(name)
        if name in keep or match is None:
            return name
        if name not in mapping:
            while True:
                candidate = f"{match.group(1)}__g{counter}"
                counter += 1
                if candidate not in taken:
                    break
            mapping[name] = candidate
            taken.add(candidate)
        return mapping[name]

    for init in graph.initializer:
        init.name = canonical(init.name)
    for node in graph.node:
        node.input[:] = [canonical(n) for n in node.input]
        node.output[:] = [canonical(n) for n in node.output]
    for value in graph.value_info:
        value.name = canonical(value.name)
    names: dict[str, str] = {}
    for k, node in enumerate(graph.node):
        match = _GENERATED.match(node.name)
        if match is not None:
            node.name = names.setdefault(node.name, f"{match.group(1)}__n{k}")


def keras_to_onnx(
    model: keras.Model,
    input_spec: InputSpec,
    *,
    output_name: str = "embedding",
    opset: int = DEFAULT_OPSET,
) -> bytes:
    """Convert an embedding model (image batch -> features) to ONNX bytes with a dynamic batch axis."""
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset} is too old; the bundle contract needs opset >= {MIN_OPSET}")
    _check_model_input(model, input_spec)
    signature = (tf.TensorSpec(input_spec.shape(None), tf.float32, name=input_spec.name),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    _rename_io(proto, input_spec.name, output_name)
    _canonical_names(proto)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def onnx_embed(model_bytes: bytes, batch: np.ndarray, input_name: str = "input") -> np.ndarray:
    """Run an ONNX embedding model on a float32 batch with onnxruntime on CPU (as the service does)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(None, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def check_parity(
    model: keras.Model,
    model_bytes: bytes,
    batch: np.ndarray,
    *,
    input_name: str = "input",
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Max |Keras - onnxruntime| over a real batch; raises `ExportParityError` above `tolerance`."""
    batch = np.asarray(batch, dtype=np.float32)
    if batch.ndim != 4 or len(batch) == 0:
        raise ExportError(f"parity batch must be a non-empty [N, ...] image batch, got shape {batch.shape}")
    expected = np.asarray(model.predict(batch, verbose=0, batch_size=256), dtype=np.float32)
    actual = onnx_embed(model_bytes, batch, input_name)
    if actual.shape != expected.shape:
        raise ExportError(
            f"ONNX output shape {actual.shape} differs from Keras output shape {expected.shape}"
        )
    diff = float(np.max(np.abs(actual - expected)))
    if not np.isfinite(diff) or diff > tolerance:
        raise ExportParityError(diff, tolerance, len(batch))
    return diff


def export_bundle(
    out_dir: Path | str,
    *,
    model: keras.Model,
    centers: np.ndarray,
    labels: list[str],
    parity_batch: np.ndarray,
    input_spec: InputSpec,
    preprocessing: Preprocessing,
    thresholds: Thresholds,
    recipe: TrainingRecipe | Mapping[str, Any],
    evaluation: Mapping[str, Any] | None = None,
    name: str = "idembed",
    version: str = "1",
    output_name: str = "embedding",
    opset: int = DEFAULT_OPSET,
    tolerance: float = PARITY_TOLERANCE,
    quantize: Callable[[bytes], Quantized] | None = None,
) -> BundleManifest:
    """Convert, verify parity, and write `model.onnx`, `centers.npy`, `labels.json`, `manifest.json`.

    `centers` are the class centers in the model's raw feature space, row k = `labels[k]`; `write_bundle`
    stores them L2-normalised (the space the service searches). Nothing is written if any check fails.
    `quantize` (fp32 ONNX bytes -> `Quantized`) runs after the parity check; its int8 graph, thresholds and
    evaluation replace the fp32 ones (see `training.quantize`), or it raises and nothing is written.
    """
    centers = np.asarray(centers, dtype=np.float32)
    model_bytes = keras_to_onnx(model, input_spec, output_name=output_name, opset=opset)
    max_diff = check_parity(model, model_bytes, parity_batch, input_name=input_spec.name, tolerance=tolerance)
    dim = int(model.output_shape[-1])
    if centers.ndim != 2 or centers.shape[1] != dim:
        raise ExportError(f"centers have shape {centers.shape}; expected [K, {dim}] (the embedding dim)")
    evaluation = dict(evaluation or {})
    evaluation["export_parity_max_abs_diff"] = float(f"{max_diff:.3g}")
    evaluation["export_parity_batch"] = len(parity_batch)
    quantization = None
    if quantize is not None:
        done = quantize(model_bytes)
        model_bytes, thresholds, quantization = done.model_bytes, done.thresholds, done.record
        # The parity figures are the fp32 graph's (int8 is checked by its EER gate instead).
        evaluation = {**done.evaluation, **{k: evaluation[k] for k in evaluation if k.startswith("export_")}}
    recipe_model = (
        recipe if isinstance(recipe, TrainingRecipe) else TrainingRecipe.model_validate(dict(recipe))
    )
    manifest = {
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": input_spec.model_dump(),
        "preprocessing": preprocessing.model_dump(),
        "embedding": {"output_name": output_name, "dim": dim},
        "num_classes": len(labels),
        "thresholds": thresholds.model_dump(),
        "training": recipe_model.model_dump(),
        "evaluation": evaluation,
        "tool_versions": {**tool_versions(), "onnx_opset": str(opset)},
        "quantization": None if quantization is None else quantization.model_dump(),
    }
    return write_bundle(out_dir, manifest=manifest, model_bytes=model_bytes, centers=centers, labels=labels)
