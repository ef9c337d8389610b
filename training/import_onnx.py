"""An existing ONNX embedding model -> a bundle: graph checked against the declared input, centers and
calibrated thresholds from a labelled identity folder (`idembed-train import`).

No TensorFlow: the model runs in onnxruntime (as the service runs it) on images preprocessed by
`bundle.preprocess` (as the service preprocesses them). Identities are split like training splits them:
held-out identities (never in the centers) give the evaluation and the out-of-sample thresholds, the others
give the centers (L2-normalised means of their L2-normalised embeddings).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bundle.files import l2_normalize, sha256_bytes, write_bundle
from bundle.manifest import BundleManifest, InputSpec, Preprocessing, Provenance, TrainingRecipe
from bundle.preprocess import preprocess_image
from training.config import CALIBRATION_IMAGES, ImportOptions, check_target_far
from training.evaluate import (
    EvaluationSettings,
    calibrate_out_of_sample,
    evaluate_embeddings,
)

BATCH_DIM = "batch"


class ModelImportError(ValueError):
    """The model or the options cannot make a bundle; the message names the option or file at fault."""


@dataclass(frozen=True)
class ImportResult:
    manifest: BundleManifest
    seconds: dict[str, float]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """A graph value's shape: fixed dims as ints, symbolic ones by name ("?" when unnamed)."""
    out: list[int | str] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or "?")
    return out


def _graph_io(proto: onnx.ModelProto) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    # Old exporters (opset < 9 style) also list every initializer as a graph input; those are weights.
    weights = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in weights], list(proto.graph.output)


def check_input(value: onnx.ValueInfoProto, opts: ImportOptions) -> list[int | str]:
    """The graph input must agree with --layout/--height/--width/--channels; errors name the option."""
    shape = _dims(value)
    elem = value.type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise ModelImportError(
            f"{opts.model}: input {value.name!r} is {onnx.TensorProto.DataType.Name(elem).lower()}; "
            "the service feeds float32 images"
        )
    if len(shape) != 4:
        raise ModelImportError(
            f"{opts.model}: input {value.name!r} has shape {shape} (rank {len(shape)}); an image model "
            "takes a rank-4 batch [N, C, H, W] (--layout NCHW) or [N, H, W, C] (--layout NHWC)"
        )
    c_at, h_at, w_at = (1, 2, 3) if opts.layout == "NCHW" else (3, 1, 2)
    other = "NHWC" if opts.layout == "NCHW" else "NCHW"
    for option, at, want in (
        ("--channels", c_at, opts.channels),
        ("--height", h_at, opts.height),
        ("--width", w_at, opts.width),
    ):
        got = shape[at]
        if isinstance(got, int) and got != want:
            hint = ""
            alt = (3, 1, 2) if opts.layout == "NCHW" else (1, 2, 3)
            if all(isinstance(shape[i], int) for i in alt) and shape[alt[0]] in (1, 3):
                hint = f"; the shape reads as {other} (--layout {other})"
            raise ModelImportError(
                f"{option} {want} (--layout {opts.layout}) disagrees with the graph: input {value.name!r} "
                f"has shape {shape}, dimension {at} is {got}{hint}"
            )
    return shape


def _pick_output(outputs: list[onnx.ValueInfoProto], opts: ImportOptions) -> onnx.ValueInfoProto:
    names = [o.name for o in outputs]
    if opts.output_name is not None:
        for o in outputs:
            if o.name == opts.output_name:
                return o
        raise ModelImportError(f"--output-name {opts.output_name!r}: the graph's outputs are {names}")
    if len(outputs) != 1:
        raise ModelImportError(f"{opts.model}: the graph has outputs {names}; choose one with --output-name")
    return outputs[0]


def _dynamic_batch(proto: onnx.ModelProto, value_names: set[str]) -> list[str]:
    """Make a fixed batch axis symbolic on the given graph inputs/outputs; returns what was changed."""
    changed = []
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.name not in value_names:
            continue
        dim0 = value.type.tensor_type.shape.dim[0]
        if dim0.HasField("dim_value"):
            changed.append(f"{value.name}: fixed batch {dim0.dim_value} made dynamic")
            dim0.ClearField("dim_value")
            dim0.dim_param = BATCH_DIM
    return changed


def _session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def preprocessing_of(opts: ImportOptions) -> tuple[InputSpec, Preprocessing]:
    if opts.layout not in ("NCHW", "NHWC"):
        raise ModelImportError(f"--layout must be NCHW or NHWC, got {opts.layout!r}")
    if opts.channels not in (1, 3):
        raise ModelImportError(f"--channels must be 1 or 3, got {opts.channels}")
    if opts.channel_order not in ("RGB", "BGR"):
        raise ModelImportError(f"--channel-order must be RGB or BGR, got {opts.channel_order!r}")
    if opts.channels == 1 and opts.channel_order == "BGR":
        raise ModelImportError("--channel-order BGR needs --channels 3")
    for option, value in (("--height", opts.height), ("--width", opts.width)):
        if not 0 < value <= 4096:
            raise ModelImportError(f"{option} must be in 1..4096, got {value}")
    if not opts.scale > 0:
        raise ModelImportError(f"--scale must be > 0, got {opts.scale}")
    for option, values in (("--mean", opts.mean), ("--std", opts.std)):
        if len(values) not in (1, opts.channels):
            raise ModelImportError(
                f"{option} has {len(values)} values; give 1 or {opts.channels} (--channels)"
            )
    if any(s <= 0 for s in opts.std):
        raise ModelImportError(f"--std values must be > 0, got {list(opts.std)}")
    by_group = opts.heldout_groups is not None or opts.heldout_group_count is not None
    if opts.heldout_groups is not None and opts.heldout_group_count is not None:
        raise ModelImportError("give --heldout-groups or --heldout-group-count, not both")
    if by_group and opts.heldout_classes is not None:
        raise ModelImportError(
            "--heldout-groups/--heldout-group-count hold out whole groups; not with --heldout-classes"
        )
    if opts.heldout_group_count is not None and opts.heldout_group_count < 1:
        raise ModelImportError(f"--heldout-group-count must be >= 1, got {opts.heldout_group_count}")
    if opts.heldout_groups is not None and any(not g or "," in g for g in opts.heldout_groups):
        raise ModelImportError("--heldout-groups: names must be non-empty and contain no ','")
    if not 0.0 < opts.heldout_fraction < 1.0 and opts.heldout_classes is None and not by_group:
        raise ModelImportError(f"--heldout-fraction must be in (0, 1), got {opts.heldout_fraction}")
    if opts.quantize not in (None, "int8"):
        raise ModelImportError(f"--quantize must be int8 (or omitted), got {opts.quantize!r}")
    check_target_far(opts.target_far)
    preprocessing = Preprocessing(
        color_mode="L" if opts.channels == 1 else "RGB",
        channel_order=opts.channel_order if opts.channels == 3 else "RGB",
        resample=opts.resample,
        scale=opts.scale,
        mean=list(opts.mean),
        std=list(opts.std),
    )
    # InputSpec.name is filled in from the graph by `import_model`.
    return InputSpec(
        layout=opts.layout, height=opts.height, width=opts.width, channels=opts.channels
    ), preprocessing


def _tool_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


_CHUNK = 64
# The PCA baseline is fitted on at most this many centre-identity images (pixels of all would not fit).
_PCA_FIT_IMAGES = 2000


def _embed(sess: ort.InferenceSession, inputs, n: int, input_name: str, output_name: str) -> np.ndarray:
    """Features of images 0..n-1, preprocessed chunk by chunk (`inputs(rows)`), so a large folder never
    exists as one float32 array."""
    return np.concatenate(
        [
            sess.run([output_name], {input_name: inputs(np.arange(i, min(i + _CHUNK, n)))})[0]
            for i in range(0, n, _CHUNK)
        ]
    )


# Images the rewritten graph is checked on against the source graph, and how far apart they may be,
# relative to the largest feature magnitude (the rewrites reorder float operations, nothing more).
_REWRITE_CHECK_IMAGES = 32
_REWRITE_TOLERANCE = 1e-4


def _rewritten(model_bytes, sess, inputs, n: int, input_name: str, output_name: str):
    """training.graph_rewrite's rewrites, kept only if they give the source graph's features on the first
    images of the folder: (bytes, session, provenance note), the source ones and "" when there is nothing
    to rewrite."""
    from training.graph_rewrite import optimize

    new_bytes, report = optimize(model_bytes)
    if new_bytes == model_bytes:
        return model_bytes, sess, ""
    batch = inputs(np.arange(min(n, _REWRITE_CHECK_IMAGES)))
    new_sess = _session(new_bytes)
    before = sess.run([output_name], {input_name: batch})[0]
    after = new_sess.run([output_name], {input_name: batch})[0]
    diff = float(np.max(np.abs(before - after))) / max(float(np.max(np.abs(before))), 1e-12)
    if not np.isfinite(diff) or diff > _REWRITE_TOLERANCE:
        raise ModelImportError(
            f"the graph rewrite changed the model's output (max relative difference {diff:.3g} on "
            f"{len(batch)} images > {_REWRITE_TOLERANCE:g}); import with --keep-graph, and please report it"
        )
    return (
        new_bytes,
        new_sess,
        f"{report.describe()}; max relative difference {diff:.2g} on {len(batch)} images",
    )


def import_model(out: Path | str, opts: ImportOptions) -> ImportResult:
    """Check, embed, calibrate and write the bundle; nothing is written if any step fails."""
    from training.data.datasets import load_dataset
    from training.data.sources import DataError
    from training.data.splits import choose_heldout, choose_heldout_groups

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    input_spec, preprocessing = preprocessing_of(opts)
    try:
        source = Path(opts.model).read_bytes()
    except OSError as exc:
        raise ModelImportError(f"--model {opts.model}: cannot read ({exc.strerror or exc})") from exc
    try:
        proto = onnx.load_from_string(source)
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf/onnx raise their own types for a file that is not a valid model
        raise ModelImportError(f"--model {opts.model}: not a valid ONNX model ({exc})") from exc
    inputs, outputs = _graph_io(proto)
    if len(inputs) != 1:
        raise ModelImportError(
            f"--model {opts.model}: the graph takes {len(inputs)} inputs {[i.name for i in inputs]}; "
            "an embedding model takes exactly one image batch"
        )
    in_value, out_value = inputs[0], _pick_output(outputs, opts)
    in_shape, out_shape = check_input(in_value, opts), _dims(out_value)
    if len(out_shape) != 2:
        raise ModelImportError(
            f"output {out_value.name!r} has shape {out_shape}; an embedding output is [N, dim] "
            "(--output-name picks another output)"
        )
    changes = _dynamic_batch(proto, {in_value.name, out_value.name})
    # A graph with several outputs: keep only the embedding (the service checks and runs that one).
    if len(outputs) > 1:
        kept = [o for o in proto.graph.output if o.name == out_value.name]
        del proto.graph.output[:]
        proto.graph.output.extend(kept)
        changes.append(f"outputs other than {out_value.name!r} dropped")
    model_bytes = proto.SerializeToString() if changes else source
    input_spec = input_spec.model_copy(update={"name": in_value.name})
    try:
        sess = _session(model_bytes)
        probe = np.zeros((2, *input_spec.shape(None)[1:]), np.float32)
        got = sess.run([out_value.name], {in_value.name: probe})[0]
    except Exception as exc:  # onnxruntime's own error types
        raise ModelImportError(
            f"--model {opts.model}: onnxruntime cannot run it on a batch of 2: {exc}"
        ) from exc
    if got.ndim != 2 or got.shape[0] != 2:
        raise ModelImportError(
            f"output {out_value.name!r} gives shape {got.shape} for a batch of 2; expected [2, dim]"
        )
    dim = int(got.shape[1])
    if isinstance(out_shape[1], int) and out_shape[1] != dim:
        raise ModelImportError(f"output {out_value.name!r} declares dim {out_shape[1]} but computes {dim}")
    seconds["check_graph"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    try:
        data = load_dataset(opts.dataset, preprocessing.color_mode)
        if opts.heldout_groups is not None or opts.heldout_group_count is not None:
            heldout = choose_heldout_groups(
                data.class_names,
                data.groups,
                names=None if opts.heldout_groups is None else list(opts.heldout_groups),
                count=opts.heldout_group_count,
                seed=opts.seed,
                source=str(opts.dataset),
            )
        else:
            heldout = choose_heldout(
                data.class_names,
                names=list(opts.heldout_classes) if opts.heldout_classes is not None else None,
                count=None,
                fraction=opts.heldout_fraction,
                seed=opts.seed,
            )
    except DataError as exc:
        raise ModelImportError(f"--dataset: {exc}") from exc
    seconds["load_dataset"] = round(time.perf_counter() - started, 2)

    def inputs(rows: np.ndarray) -> np.ndarray:
        return np.stack(
            [preprocess_image(np.asarray(data.images[i]), preprocessing, input_spec) for i in rows]
        )

    started = time.perf_counter()
    n = len(data.labels)
    if opts.rewrite_graph:
        model_bytes, sess, note = _rewritten(model_bytes, sess, inputs, n, in_value.name, out_value.name)
        changes += [note] if note else []
    features = _embed(sess, inputs, n, in_value.name, out_value.name)
    if not np.all(np.isfinite(features)):
        raise ModelImportError(f"--model {opts.model}: non-finite embeddings on --dataset {opts.dataset}")
    seconds["embed"] = round(time.perf_counter() - started, 2)

    held_set = set(heldout)
    train_names = [n for n in data.class_names if n not in held_set]
    held_k = [data.class_names.index(n) for n in heldout]
    train_k = [data.class_names.index(n) for n in train_names]
    is_held = np.isin(data.labels, held_k)
    y_held = np.searchsorted(np.asarray(held_k), data.labels[is_held])
    # The group of each held-out identity (episodes are drawn within one group, as for a trained model).
    groups = None if data.groups is None else [data.groups[k] for k in held_k]
    settings = EvaluationSettings(seed=opts.seed)

    started = time.perf_counter()
    ev = evaluate_embeddings("imported", l2_normalize(features[is_held]), y_held, settings, groups=groups)
    quantization = None
    if opts.quantize == "int8":
        from training import quantize as q

        rng = np.random.default_rng(opts.seed)
        pool = np.flatnonzero(~is_held)
        calib = inputs(np.sort(rng.choice(pool, min(CALIBRATION_IMAGES, len(pool)), replace=False)))
        gate = q.quantize_gated(
            model_bytes,
            heldout=inputs(np.flatnonzero(is_held)),
            fp32_eer=ev.verification.eer,
            eer_of=lambda emb: (
                evaluate_embeddings(
                    "int8", emb, y_held, replace(settings, calibration_repeats=1, episodes=0)
                ).verification.eer
            ),
            input_name=in_value.name,
            output_name=out_value.name,
            method=opts.quantize_method,
            calibration=calib,
            max_eer_increase=q.MAX_EER_INCREASE,
            min_mean_cosine=q.MIN_INT8_MEAN_COSINE,
            fp32_features=features[is_held],  # the served fp32 graph's, embedded above
        )
        model_bytes, quantization = gate.int8_bytes, gate.record
        # What is served is the int8 model: its centers, evaluation and thresholds.
        features = _embed(_session(model_bytes), inputs, n, in_value.name, out_value.name)
        ev = evaluate_embeddings("imported-int8", gate.int8_embeddings, y_held, settings, groups=groups)
    from training.evaluate import CalibrationError

    try:
        thresholds = calibrate_out_of_sample(ev, target_far=opts.target_far, min_errors=settings.min_errors)
    except CalibrationError as exc:
        raise ModelImportError(f"--heldout-fraction/--heldout-classes: {exc}") from exc
    evaluation: dict[str, object] = {
        "protocol": (
            f"pairs on {len(heldout)} identities of {opts.dataset} not used for the centers, "
            f"seed {opts.seed}; "
            f"thresholds chosen on {len(ev.split.calibration_classes)} of them and measured on the other "
            f"{len(ev.split.test_classes)}"
        ),
        "protocol_settings": {
            k: v for k, v in settings.as_dict().items() if isinstance(v, int | float | str)
        },
        **ev.summary(),
    }
    if opts.pca_components:
        from training.baselines import PixelPCAEmbedder

        pool = np.flatnonzero(~is_held)
        fit = np.random.default_rng(opts.seed).choice(pool, min(_PCA_FIT_IMAGES, len(pool)), replace=False)
        pca = PixelPCAEmbedder(opts.pca_components, seed=opts.seed).fit(inputs(np.sort(fit)))
        evaluation["baseline_pca"] = evaluate_embeddings(
            "pca", pca.embed(inputs(np.flatnonzero(is_held))), y_held, settings
        ).summary()
    seconds["evaluate"] = round(time.perf_counter() - started, 2)

    if opts.embed_preprocessing:  # inputgraph: serve a graph that takes uint8 pixels (parity-checked)
        from training.export import add_preprocessing, check_pixel_parity

        pixel_bytes = add_preprocessing(model_bytes, input_spec, preprocessing)
        diff = check_pixel_parity(model_bytes, pixel_bytes, input_spec, preprocessing)
        evaluation["export_pixel_parity_max_abs_diff"] = float(f"{diff:.3g}")
        model_bytes = pixel_bytes
        changes = [*changes, "preprocessing subgraph prepended: the input is uint8 NHWC pixels"]
        input_spec = input_spec.model_copy(update={"dtype": "uint8", "layout": "NHWC"})
    unit = l2_normalize(features)
    centers = np.stack([l2_normalize(unit[data.labels == k].mean(axis=0)[None])[0] for k in train_k])
    provenance = Provenance(
        source_file=Path(opts.model).name,
        source_sha256=sha256_bytes(source),
        source_bytes=len(source),
        original_input_name=in_value.name,
        original_output_name=out_value.name,
        original_input_shape=in_shape,
        original_output_shape=out_shape,
        opset=max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
        producer=f"{proto.producer_name} {proto.producer_version}".strip(),
        changes=changes,
    )
    recipe = TrainingRecipe(
        backbone="imported",
        head="none",
        center_update="none",
        center_lambda=0.0,
        center_alpha=1.0,
        epochs=0,
        batch_size=64,
        seed=opts.seed,
        dataset=str(opts.dataset),
        train_classes=train_names,
        heldout_classes=heldout,
        val_fraction=0.0,
        options={
            "source_sha256": provenance.source_sha256,
            "heldout_fraction": opts.heldout_fraction,
            # Scalars, as a trained recipe's (training/workflows/manifest_recipe.py): groups comma-joined.
            **({} if opts.heldout_groups is None else {"heldout_groups": ",".join(opts.heldout_groups)}),
            **({} if opts.heldout_group_count is None else {"heldout_group_count": opts.heldout_group_count}),
        },
    )
    manifest = {
        "name": opts.name,
        "version": opts.version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": input_spec.model_dump(),
        "preprocessing": preprocessing.model_dump(),
        "embedding": {"output_name": out_value.name, "dim": dim},
        "num_classes": len(train_names),
        "thresholds": thresholds.model_dump(),
        "training": recipe.model_dump(),
        "evaluation": evaluation,
        "tool_versions": _tool_versions(),
        "provenance": provenance.model_dump(),
        "quantization": None if quantization is None else quantization.model_dump(),
    }
    written = write_bundle(
        out, manifest=manifest, model_bytes=model_bytes, centers=centers, labels=train_names
    )
    return ImportResult(written, seconds)


def heldout_inputs(manifest: BundleManifest) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """An imported bundle's held-out images (model inputs, preprocessed as the service does), labels and the
    group of each held-out identity (None without groups), re-read from its recorded `training.dataset`:
    what `check-bundle` re-measures its numbers on."""
    from training.data.datasets import load_dataset

    data = load_dataset(manifest.training.dataset, manifest.preprocessing.color_mode)
    held = [data.class_names.index(n) for n in manifest.training.heldout_classes]
    rows = np.flatnonzero(np.isin(data.labels, held))
    x = np.stack(
        [preprocess_image(np.asarray(data.images[i]), manifest.preprocessing, manifest.input) for i in rows]
    )
    groups = None if data.groups is None else [data.groups[k] for k in held]
    return x, np.searchsorted(np.asarray(held), data.labels[rows]), groups
