"""fp32 ONNX embedding model -> int8 (onnxruntime.quantization), kept only if held-out EER stays in bounds.

Used by `idembed-train export --quantize int8` and `idembed-train import --quantize int8`. No TensorFlow:
both models run in onnxruntime on CPU, as the service runs them, on the same held-out identities and pairs.

**The same arithmetic on every CPU: 7-bit weights.** onnxruntime's uint8 x int8 kernels multiply-accumulate
in one exact int32 instruction on CPUs with VNNI or AMX, but on plain AVX2 and AVX512BW (`VPMADDUBSW`) they
add each pair of products in int16 first, which saturates once both values are large (255 x 127 x 2 >
32767). The same int8 graph then computes another function on those CPUs, and the gate below, measured on
the quantizing machine, does not hold on the serving one. Measured on an AMD EPYC (AVX2 only), the committed
default bundle's graph imported with `--quantize int8` and 8-bit weights: held-out EER 0.0128 against fp32's
0.0095, mean cosine to fp32 0.9907 (on an Intel Xeon with VNNI the same graph gave 0.0095 and 0.9997).
With the weights quantized to 7 bits (onnxruntime's `reduce_range`) no pair can saturate (255 x 63 x 2 <
32767), and on the same AMD machine: EER 0.0096, mean cosine 0.9994. So every int8 graph here has 7-bit
weights (`WEIGHT_BITS`, recorded in the manifest); the kernels, and so the speed, are the same
(docs/performance.md#int8-models).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bundle.files import l2_normalize, sha256_bytes
from bundle.host import describe
from bundle.manifest import Quantization, Thresholds
from training.config import DEFAULT_QUANTIZE_METHOD as DEFAULT_METHOD

# The accuracy gate (MAX_EER_INCREASE), the methods and the calibration image count are option defaults:
# defined with the config models.
from training.config import MAX_EER_INCREASE, MIN_INT8_MEAN_COSINE
from training.config import QUANTIZE_METHODS as METHODS
from training.graph_rewrite import grouped_as_depthwise, optimize

_EMBED_BATCH = 64
# Weights take 7 of the 8 bits (onnxruntime's reduce_range): no CPU's int8 kernel can saturate (module doc).
WEIGHT_BITS = 7


class QuantizationError(ValueError):
    """The model cannot be quantized, or int8 loses too much accuracy (the message has both EERs)."""


class QuantizationRefused(QuantizationError):
    def __init__(self, fp32_eer: float, int8_eer: float, max_increase: float) -> None:
        self.fp32_eer, self.int8_eer, self.max_increase = fp32_eer, int8_eer, max_increase
        super().__init__(
            f"--quantize int8 refused: held-out EER {int8_eer:.4f} (int8) vs {fp32_eer:.4f} (fp32), "
            f"+{int8_eer - fp32_eer:.4f} is over the allowed +{max_increase:g}; no bundle written "
            "(try --quantize-method dynamic/static, or keep fp32)"
        )


class QuantizationUnfaithful(QuantizationError):
    def __init__(self, mean_cosine: float, min_mean_cosine: float) -> None:
        self.mean_cosine, self.min_mean_cosine = mean_cosine, min_mean_cosine
        super().__init__(
            f"--quantize int8 refused: the int8 model's embeddings of the held-out images have a mean "
            f"cosine of {mean_cosine:.4f} to the fp32 model's, under the required {min_mean_cosine:g}: it is "
            "not the same model; no bundle written (try --quantize-method dynamic, or keep fp32)"
        )


def session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def embed(
    model_bytes: bytes, batch: np.ndarray, input_name: str, output_name: str | None = None
) -> np.ndarray:
    """Raw features of a float32 batch, in chunks (as the service would run them)."""
    sess = session(model_bytes)
    outputs = None if output_name is None else [output_name]
    chunks = [
        sess.run(outputs, {input_name: np.ascontiguousarray(batch[i : i + _EMBED_BATCH], np.float32)})[0]
        for i in range(0, len(batch), _EMBED_BATCH)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


# The speed figure recorded with an int8 bundle: raw onnxruntime (default threads) on one batch of at most
# this many held-out images, each model timed for at least SPEED_SECONDS, best of SPEED_REPEATS.
SPEED_BATCH = 32
SPEED_SECONDS = 0.3
SPEED_REPEATS = 3


def images_per_second(model_bytes: bytes, batch: np.ndarray, input_name: str) -> float:
    """Raw onnxruntime throughput of `model_bytes` on `batch` on this machine (a benchmark, not a contract:
    the serving machine's figure can differ)."""
    sess = session(model_bytes)
    feed = {input_name: np.ascontiguousarray(batch, np.float32)}
    sess.run(None, feed)
    best = 0.0
    for _ in range(SPEED_REPEATS):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < SPEED_SECONDS or calls == 0:
            sess.run(None, feed)
            calls += 1
        best = max(best, calls * len(batch) / elapsed)
    return best


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over preprocessed images."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int = 16) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            {input_name: np.ascontiguousarray(images[i : i + batch], np.float32)}
            for i in range(0, len(images), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(
    model_bytes: bytes,
    *,
    method: str = DEFAULT_METHOD,
    calibration: np.ndarray | None = None,
    input_name: str = "input",
) -> bytes:
    """An int8 version of the graph: `static` (QLinear ops, per-channel int8 weights, activation ranges from
    the `calibration` images) or `dynamic` (int8 weights, activations quantized per call)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    if method not in METHODS:
        raise QuantizationError(f"--quantize-method must be one of {', '.join(METHODS)}, got {method!r}")
    # Exact rewrites onnxruntime's int8 kernels need (training/graph_rewrite.py): PReLU in the int8 form (one
    # depthwise Conv + Relu; else the quantizer turns Keras' PReLU into a ReLU), grouped convolutions as
    # depthwise ones.
    reduce_range = WEIGHT_BITS == 7  # 7-bit weights: the same arithmetic on every CPU (module doc)
    model_bytes, _ = optimize(model_bytes, form="int8")
    model_bytes, _ = grouped_as_depthwise(model_bytes)
    with tempfile.TemporaryDirectory(prefix="idembed-quant-") as tmp:
        src, pre, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model_bytes)
        try:
            # Shape inference + graph folding first, as onnxruntime recommends (fuses Conv+BN etc.).
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimisation; a graph it cannot fold is quantized as is
            pre = src
        try:
            if method == "dynamic":
                quantize_dynamic(
                    str(pre),
                    str(dst),
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    reduce_range=reduce_range,
                )
            else:
                if calibration is None or len(calibration) == 0:
                    raise QuantizationError("static int8 quantization needs calibration images")
                quantize_static(
                    str(pre),
                    str(dst),
                    _Reader(calibration, input_name),
                    # QOperator (QLinearConv/QLinearMatMul) with uint8 activations and int8 weights: on
                    # x86 it ran 642 img/s vs 312 for the QDQ form of the same graph (facecnn 112x112,
                    # 1 thread; fp32 170), see docs/performance.md.
                    quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    reduce_range=reduce_range,
                    calibrate_method=CalibrationMethod.MinMax,
                )
        except QuantizationError:
            raise
        except Exception as exc:  # onnxruntime.quantization raises assorted types on graphs it cannot do
            raise QuantizationError(f"onnxruntime cannot quantize the model ({method}): {exc}") from exc
        out = dst.read_bytes()
    onnx.checker.check_model(onnx.load_from_string(out))
    return out


def _speed(fp32: bytes, int8: bytes, batch: np.ndarray, input_name: str) -> dict:
    """Both models' raw onnxruntime throughput on one batch here, for the manifest."""
    rates = {k: images_per_second(b, batch, input_name) for k, b in (("fp32", fp32), ("int8", int8))}
    return {
        "fp32_images_per_s": round(rates["fp32"], 1),
        "int8_images_per_s": round(rates["int8"], 1),
        # The CPU and its int8 instructions decide what int8 buys (bundle/host.py), so they are named.
        "speed_measured_on": f"{describe()}, onnxruntime {ort.__version__}, batch {len(batch)}",
    }


@dataclass(frozen=True)
class Quantized:
    """What replaces the fp32 parts of a bundle being written: the int8 graph and what it measured."""

    model_bytes: bytes
    thresholds: Thresholds
    evaluation: dict
    record: Quantization


@dataclass(frozen=True)
class GateResult:
    int8_bytes: bytes
    fp32_eer: float
    int8_eer: float
    record: Quantization
    # L2-normalised int8 embeddings of the held-out images (for the manifest's evaluation and thresholds).
    int8_embeddings: np.ndarray


def quantize_gated(
    model_bytes: bytes,
    *,
    heldout: np.ndarray,
    fp32_eer: float,
    eer_of,
    input_name: str,
    output_name: str | None = None,
    method: str = DEFAULT_METHOD,
    calibration: np.ndarray | None = None,
    max_eer_increase: float = MAX_EER_INCREASE,
    min_mean_cosine: float = MIN_INT8_MEAN_COSINE,
    fp32_features: np.ndarray | None = None,
) -> GateResult:
    """Quantize, embed the held-out images with both models and accept the int8 one only if its embeddings
    have a mean cosine of at least `min_mean_cosine` to the fp32 ones (else `QuantizationUnfaithful`) and
    `eer_of(int8 embeddings) <= fp32_eer + max_eer_increase` (else `QuantizationRefused` naming both EERs).

    `eer_of` maps L2-normalised held-out embeddings to their EER under the caller's protocol (same pairs as
    the fp32 figure). `fp32_features`: the fp32 graph's raw features of `heldout` in onnxruntime, when the
    caller has them (else they are computed here)."""
    int8 = quantize_int8(model_bytes, method=method, calibration=calibration, input_name=input_name)
    emb = l2_normalize(embed(int8, heldout, input_name, output_name))
    if not np.all(np.isfinite(emb)):
        raise QuantizationError("the int8 model gives non-finite embeddings on the held-out images")
    if fp32_features is None:
        fp32_features = embed(model_bytes, heldout, input_name, output_name)
    reference = l2_normalize(fp32_features)
    mean_cosine = float(np.mean(np.sum(reference * emb, axis=1)))
    if mean_cosine < min_mean_cosine:
        raise QuantizationUnfaithful(mean_cosine, min_mean_cosine)
    int8_eer = float(eer_of(emb))
    if int8_eer > fp32_eer + max_eer_increase:
        raise QuantizationRefused(fp32_eer, int8_eer, max_eer_increase)
    record = Quantization(
        method=f"{method}-int8",
        weight_bits=WEIGHT_BITS,
        fp32_eer=round(fp32_eer, 6),
        int8_eer=round(int8_eer, 6),
        max_eer_increase=max_eer_increase,
        fp32_sha256=sha256_bytes(model_bytes),
        fp32_bytes=len(model_bytes),
        num_images=len(heldout),
        mean_cosine_to_fp32=round(mean_cosine, 6),
        min_mean_cosine=min_mean_cosine,
        **_speed(model_bytes, int8, heldout[:SPEED_BATCH], input_name),
    )
    return GateResult(int8, fp32_eer, int8_eer, record, emb)
