"""A verified bundle turned into a runnable onnxruntime session whose graph agrees with the manifest."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bundle.errors import BundleError
from bundle.files import Bundle, l2_normalize, load_bundle
from bundle.manifest import MODEL_FILE


@dataclass(frozen=True)
class RuntimeOptions:
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    allow_spinning: bool = True
    # With spinning: the threads spin between the parallel sections of one call, not after it (onnxruntime's
    # `session.force_spinning_stop`), so a lone request gets the fast hand-over between operators without
    # burning a core until the next one (docs/service.md, Speed).
    stop_spinning_after_run: bool = False
    # The last warm-up call runs a batch this large, so onnxruntime's memory arena is sized for the largest
    # batch before the first request: memory is flat from start-up, and no early request pays the growth.
    warmup_batch_size: int = 2
    # Calls that will run at once (inference workers): each holds its own activations, so the largest batch
    # is also run this many times concurrently during warm-up.
    warmup_concurrency: int = 1


# onnxruntime's name of each manifest `input.dtype`.
_ORT_TYPES = {"float32": "tensor(float)", "uint8": "tensor(uint8)"}


def _dim_ok(declared: object, expected: int | None) -> bool:
    # ONNX dims are ints when fixed and strings (symbolic) or None when dynamic.
    if expected is None:
        return not isinstance(declared, int) or declared in (-1, 0)
    return not isinstance(declared, int) or declared == expected


class EmbeddingModel:
    """The served model: bundle + onnxruntime session. `run` maps a batch of model inputs (float32, or uint8
    pixels for a bundle with the preprocessing subgraph: `manifest.input.dtype`) to L2-normalised embeddings.

    Construction checks the ONNX graph against the manifest (input name, dtype, rank, layout dims, dynamic
    batch, output name and embedding dim) and runs one inference, so a model that would fail on the first
    request fails at load time instead, with a `BundleError` naming model.onnx.
    """

    def __init__(self, bundle: Bundle, options: RuntimeOptions | None = None) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        options = options or RuntimeOptions()
        model_path = bundle.path / MODEL_FILE
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.log_severity_level = 3
        if not options.allow_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif options.stop_spinning_after_run:
            so.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self.session = ort.InferenceSession(
                bundle.model_bytes, sess_options=so, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for any bad graph
            raise BundleError(model_path, f"onnxruntime cannot load the model: {exc}") from exc
        self._check_graph(model_path)
        self.input_name = self.manifest.input.name
        self.output_name = self.manifest.embedding.output_name
        self.dim = self.manifest.embedding.dim
        self.input_shape = self.manifest.input.shape(None)[1:]
        self.input_dtype = np.dtype(self.manifest.input.dtype)
        self.warmup_ms = self._warm_up(
            model_path, max(2, options.warmup_batch_size), options.warmup_concurrency
        )

    @classmethod
    def load(cls, path: Path | str, options: RuntimeOptions | None = None) -> EmbeddingModel:
        return cls(load_bundle(path), options)

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    def _check_graph(self, model_path: Path) -> None:
        spec = self.manifest.input
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if spec.name not in inputs:
            raise BundleError(
                model_path, f"has no input {spec.name!r} (manifest input.name); inputs are {sorted(inputs)}"
            )
        if len(inputs) != 1:
            raise BundleError(model_path, f"must have exactly one input, has {sorted(inputs)}")
        declared = inputs[spec.name]
        want = _ORT_TYPES[spec.dtype]
        if declared.type != want:
            what = (
                "uint8 pixels (input.dtype: the preprocessing is in the graph)"
                if spec.dtype == "uint8"
                else "float32 (input.dtype)"
            )
            raise BundleError(model_path, f"input {spec.name!r} is {declared.type}, manifest says {what}")
        expected = spec.shape(None)
        if len(declared.shape) != 4 or not all(
            _dim_ok(d, e) for d, e in zip(declared.shape, expected, strict=True)
        ):
            raise BundleError(
                model_path,
                f"input {spec.name!r} has shape {declared.shape}; manifest ({spec.layout}) says "
                f"{['N', *expected[1:]]} with a dynamic batch axis",
            )
        out_name = self.manifest.embedding.output_name
        if out_name not in outputs:
            raise BundleError(
                model_path,
                f"has no output {out_name!r} (manifest embedding.output_name); outputs are {sorted(outputs)}",
            )
        out_shape = outputs[out_name].shape
        dim = self.manifest.embedding.dim
        if len(out_shape) != 2 or not _dim_ok(out_shape[1], dim):
            raise BundleError(
                model_path, f"output {out_name!r} has shape {out_shape}; manifest says [N, {dim}]"
            )

    def _warm_up(self, model_path: Path, largest: int, concurrency: int = 1) -> float:
        # Two different batch sizes at least: the first call allocates, the others prove the batch axis is
        # dynamic; the largest sizes the memory arena, once per call that can run at the same time.
        start = time.perf_counter()
        self._probe(model_path, 1)
        if concurrency <= 1:
            self._probe(model_path, largest)
        else:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                for done in [pool.submit(self._probe, model_path, largest) for _ in range(concurrency)]:
                    done.result()
        return (time.perf_counter() - start) * 1000.0

    def _probe(self, model_path: Path, n: int) -> None:
        probe = np.zeros((n, *self.input_shape), dtype=self.input_dtype)
        try:
            out = self.session.run([self.output_name], {self.input_name: probe})[0]
        except Exception as exc:
            raise BundleError(model_path, f"warm-up inference with batch {n} failed: {exc}") from exc
        if out.shape != (n, self.dim):
            raise BundleError(
                model_path, f"warm-up with batch {n} gave shape {out.shape}, expected ({n}, {self.dim})"
            )

    def run_raw(self, batch: np.ndarray) -> np.ndarray:
        """One onnxruntime call on a batch of model inputs: the raw (unnormalised) features."""
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings for a batch `[N, ...]` of model inputs, L2-normalised (the space search uses)."""
        return l2_normalize(self.run_raw(batch))
