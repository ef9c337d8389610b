"""Keras embedding model -> ONNX (tf2onnx, dynamic batch) verified against Keras, then written as a bundle.

The export refuses to produce a bundle whose ONNX graph disagrees with the Keras model: a parity check runs
both on a real batch and fails with `ExportParityError` above the tolerance (1e-4 by default).

`embed_preprocessing=True` (`idembed-train export --embed-preprocessing`) prepends the bundle's
normalisation to the graph (`add_preprocessing`): the model then takes uint8 pixels `[N, H, W, C]` at its
input size and the manifest says `input.dtype = "uint8"`, so the service only decodes and resizes. The
subgraph is `bundle.preprocess.normalization` as ONNX operators, in the order numpy applies it, and is
checked against the float graph on the numpy-normalised pixels before anything is written.
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
from bundle.preprocess import normalization, normalize_pixels
from training.config import PARITY_TOLERANCE
from training.graph_rewrite import optimize

if TYPE_CHECKING:
    from collections.abc import Callable

    from training.quantize import Quantized

MIN_OPSET = 17
DEFAULT_OPSET = 17
# The preprocessing subgraph against numpy's normalisation, on the same graph: rounding only.
PIXEL_PARITY_TOLERANCE = 1e-5
PIXEL_PARITY_BATCH = 8
# Names of what `add_preprocessing` adds (a prefix no tf2onnx name has), so `strip_preprocessing` finds them.
PREPROCESS_PREFIX = "idembed_preprocess/"
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
    optimize_graph: bool = True,
) -> bytes:
    """Convert an embedding model (image batch -> features) to ONNX bytes with a dynamic batch axis.

    `optimize_graph`: apply training.graph_rewrite's exact rewrites (PReLU, grouped convolutions), which
    onnxruntime runs 1.3-3x faster; the caller's parity check against Keras covers them."""
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset} is too old; the bundle contract needs opset >= {MIN_OPSET}")
    _check_model_input(model, input_spec)
    signature = (tf.TensorSpec(input_spec.shape(None), tf.float32, name=input_spec.name),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    _rename_io(proto, input_spec.name, output_name)
    _canonical_names(proto)
    onnx.checker.check_model(proto)
    model_bytes = proto.SerializeToString()
    return optimize(model_bytes)[0] if optimize_graph else model_bytes


def add_preprocessing(model_bytes: bytes, input_spec: InputSpec, preprocessing: Preprocessing) -> bytes:
    """A float32-input embedding graph -> the same graph taking uint8 pixels `[N, H, W, C]` (channels in
    `color_mode` order), with the bundle's normalisation as its first nodes: Cast, (Gather: BGR), Mul(scale),
    Sub(mean), Div(std), (Transpose: NCHW) - the float32 steps of `bundle.preprocess.normalize_pixels`, in
    its order. The input keeps its name; the old float input becomes an inner tensor."""
    proto = onnx.load_from_string(model_bytes)
    graph = proto.graph
    if len(graph.input) != 1 or graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ExportError("the preprocessing subgraph needs a graph with one float32 input")
    if any(n.name.startswith(PREPROCESS_PREFIX) for n in graph.node):
        raise ExportError("the graph already has the preprocessing subgraph")
    name = graph.input[0].name
    if any(out.name == name for out in graph.output):
        raise ExportError("the graph's input is also its output")
    if any(a.type == onnx.AttributeProto.GRAPH for n in graph.node for a in n.attribute):
        # A control-flow body (If/Loop) may read the input by name; rewiring those is not supported.
        raise ExportError("the preprocessing subgraph cannot be added to a graph with control-flow bodies")
    norm = normalization(preprocessing, input_spec)
    p = PREPROCESS_PREFIX
    inner = f"{p}normalized"
    for node in graph.node:
        node.input[:] = [inner if n == name else n for n in node.input]
    steps: list[tuple[str, list[str], dict]] = [("Cast", [], {"to": onnx.TensorProto.FLOAT})]
    constants = []
    if norm.reverse_channels:
        constants.append(onnx.numpy_helper.from_array(np.array([2, 1, 0], np.int64), f"{p}bgr"))
        steps.append(("Gather", [f"{p}bgr"], {"axis": 3}))
    for op, key, value in (
        ("Mul", "scale", norm.scale),
        ("Sub", "mean", norm.mean),
        ("Div", "std", norm.std),
    ):
        constants.append(onnx.numpy_helper.from_array(np.asarray(value, np.float32), f"{p}{key}"))
        steps.append((op, [f"{p}{key}"], {}))
    if norm.channels_first:
        steps.append(("Transpose", [], {"perm": [0, 3, 1, 2]}))
    nodes, current = [], name
    for k, (op, extra, attrs) in enumerate(steps):
        out = inner if k == len(steps) - 1 else f"{p}{op.lower()}"
        nodes.append(onnx.helper.make_node(op, [current, *extra], [out], name=f"{p}{op}", **attrs))
        current = out
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *body])
    graph.initializer.extend(constants)
    shape = [BATCH_DIM, input_spec.height, input_spec.width, input_spec.channels]
    del graph.input[:]
    graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, shape))
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def strip_preprocessing(model_bytes: bytes) -> bytes:
    """The float32-input graph inside one made by `add_preprocessing` (unchanged bytes for any other graph):
    what `onnx_embed` runs when it is given already normalised inputs for a pixel graph."""
    proto = onnx.load_from_string(model_bytes)
    graph = proto.graph
    ours = [n for n in graph.node if n.name.startswith(PREPROCESS_PREFIX)]
    if not ours:
        return model_bytes
    name = graph.input[0].name
    inner = f"{PREPROCESS_PREFIX}normalized"
    body = [n for n in graph.node if not n.name.startswith(PREPROCESS_PREFIX)]
    for node in body:
        node.input[:] = [name if n == inner else n for n in node.input]
    del graph.node[:]
    graph.node.extend(body)
    keep = [i for i in graph.initializer if not i.name.startswith(PREPROCESS_PREFIX)]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    if any(n.op_type == "Transpose" for n in ours):
        dims = [dims[0], dims[3], dims[1], dims[2]]
    del graph.input[:]
    graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def onnx_embed(model_bytes: bytes, batch: np.ndarray, input_name: str = "input") -> np.ndarray:
    """Run an ONNX embedding model on a batch with onnxruntime on CPU (as the service does).

    A float32-input model takes the normalised batch. A pixel model (`add_preprocessing`) takes uint8 pixels;
    given a float batch (already normalised: training's arrays), its float body runs on it instead."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    kind = next((i.type for i in session.get_inputs() if i.name == input_name), None)
    if kind == "tensor(uint8)":
        if np.asarray(batch).dtype == np.uint8:
            return session.run(None, {input_name: np.ascontiguousarray(batch)})[0]
        session = ort.InferenceSession(
            strip_preprocessing(model_bytes), options, providers=["CPUExecutionProvider"]
        )
    return session.run(None, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def check_pixel_parity(
    float_bytes: bytes,
    pixel_bytes: bytes,
    input_spec: InputSpec,
    preprocessing: Preprocessing,
    *,
    seed: int = 0,
    tolerance: float = PIXEL_PARITY_TOLERANCE,
) -> float:
    """Max |float graph(numpy-normalised pixels) - pixel graph(pixels)| over seeded random uint8 pixels;
    raises `ExportParityError` above `tolerance`. The normalisation is per pixel, so any pixels test it."""
    rng = np.random.default_rng(seed)
    shape = (PIXEL_PARITY_BATCH, input_spec.height, input_spec.width, input_spec.channels)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    expected = onnx_embed(float_bytes, normalize_pixels(pixels, preprocessing, input_spec), input_spec.name)
    actual = onnx_embed(pixel_bytes, pixels, input_spec.name)
    diff = float(np.max(np.abs(actual - expected)))
    if not np.isfinite(diff) or diff > tolerance:
        raise ExportParityError(diff, tolerance, len(pixels))
    return diff


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
    embed_preprocessing: bool = False,
) -> BundleManifest:
    """Convert, verify parity, and write `model.onnx`, `centers.npy`, `labels.json`, `manifest.json`.

    `centers` are the class centers in the model's raw feature space, row k = `labels[k]`; `write_bundle`
    stores them L2-normalised (the space the service searches). Nothing is written if any check fails.
    `quantize` (fp32 ONNX bytes -> `Quantized`) runs after the parity check; its int8 graph, thresholds and
    evaluation replace the fp32 ones (see `training.quantize`), or it raises and nothing is written.
    `embed_preprocessing`: the graph (int8 or fp32) gets the preprocessing subgraph (`add_preprocessing`),
    checked by `check_pixel_parity`, and the manifest's input becomes uint8 NHWC pixels.
    """
    centers = np.asarray(centers, dtype=np.float32)
    converted = keras_to_onnx(model, input_spec, output_name=output_name, opset=opset, optimize_graph=False)
    model_bytes, rewrites = optimize(converted)
    max_diff = check_parity(model, model_bytes, parity_batch, input_name=input_spec.name, tolerance=tolerance)
    dim = int(model.output_shape[-1])
    if centers.ndim != 2 or centers.shape[1] != dim:
        raise ExportError(f"centers have shape {centers.shape}; expected [K, {dim}] (the embedding dim)")
    evaluation = dict(evaluation or {})
    evaluation["export_parity_max_abs_diff"] = float(f"{max_diff:.3g}")
    evaluation["export_parity_batch"] = len(parity_batch)
    evaluation["export_graph_rewrites"] = rewrites.describe()
    quantization = None
    if quantize is not None:
        done = quantize(model_bytes)
        model_bytes, thresholds, quantization = done.model_bytes, done.thresholds, done.record
        # The parity figures are the fp32 graph's (int8 is checked by its EER gate instead).
        evaluation = {**done.evaluation, **{k: evaluation[k] for k in evaluation if k.startswith("export_")}}
    if embed_preprocessing:
        pixel_bytes = add_preprocessing(model_bytes, input_spec, preprocessing)
        pixel_diff = check_pixel_parity(model_bytes, pixel_bytes, input_spec, preprocessing)
        evaluation["export_pixel_parity_max_abs_diff"] = float(f"{pixel_diff:.3g}")
        model_bytes = pixel_bytes
        input_spec = input_spec.model_copy(update={"dtype": "uint8", "layout": "NHWC"})
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
