"""The bundle manifest: one pydantic schema, written by training/export and read by service/ (no TF)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# 2 added `Thresholds.calibration_identities` and `Thresholds.out_of_sample` (optional: v1 still loads).
# 3 added `Preprocessing.channel_order`, `provenance` (imported models) and `quantization` (all optional with
# defaults, so v1/v2 manifests still load; `training.epochs` may be 0 for a model not trained here).
# 4 added `InputSpec.dtype = "uint8"`: a model with the normalisation inside its graph (default float32, so
# v1-v3 manifests still load and mean what they meant).
SCHEMA_VERSION = 4

MODEL_FILE = "model.onnx"
CENTERS_FILE = "centers.npy"
LABELS_FILE = "labels.json"
MANIFEST_FILE = "manifest.json"
# Files whose sha256 the manifest must carry; the manifest itself cannot hash itself.
REQUIRED_FILES = (MODEL_FILE, CENTERS_FILE, LABELS_FILE)


class _Strict(BaseModel):
    # Unknown keys are a typo or a newer schema: refuse rather than silently ignore them.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class InputSpec(_Strict):
    """What the ONNX model takes, with a dynamic batch axis N.

    - `dtype = "float32"`: the normalised input, `[N, H, W, C]` (NHWC) or `[N, C, H, W]` (NCHW): every
      `Preprocessing` step happens before the model.
    - `dtype = "uint8"` (schema 4, `idembed-train export --embed-preprocessing`): the pixels after the resize,
      `[N, H, W, C]` with channels in `preprocessing.color_mode` order (layout must be NHWC). The model's own
      graph does the rest of `Preprocessing` (float, channel order, scale, mean/std, layout), so a client
      only decodes, converts and resizes.
    """

    name: str = "input"
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    channels: Literal[1, 3]
    dtype: Literal["float32", "uint8"] = "float32"

    @model_validator(mode="after")
    def _pixels_are_nhwc(self) -> InputSpec:
        if self.dtype == "uint8" and self.layout != "NHWC":
            raise ValueError("input.dtype uint8 (pixels, normalised in the graph) needs layout NHWC")
        return self

    @property
    def takes_pixels(self) -> bool:
        """True when the model normalises its uint8 input itself (the preprocessing subgraph)."""
        return self.dtype == "uint8"

    def shape(self, batch: int | None = None) -> tuple[int | None, int, int, int]:
        if self.layout == "NHWC":
            return (batch, self.height, self.width, self.channels)
        return (batch, self.channels, self.height, self.width)


class Preprocessing(_Strict):
    """How an image becomes a model input; `bundle.preprocess` is the one implementation of it.

    Steps, in order: decode -> convert to `color_mode` (Pillow) -> resize to (width, height) of the input with
    `resample` -> float32 -> channels reordered to `channel_order` (RGB images only) -> `* scale` ->
    `(x - mean) / std` per channel (in `channel_order`: with BGR, mean[0] is blue's) -> layout.
    insightface's ArcFace convention is `color_mode=RGB, scale=1, mean=[127.5], std=[127.5]`, NCHW input.
    """

    color_mode: Literal["L", "RGB"]
    # The order the model wants its 3 channels in (OpenCV-trained models often want BGR); ignored for L.
    channel_order: Literal["RGB", "BGR"] = "RGB"
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos", "box"] = "bilinear"
    scale: float = Field(default=1.0 / 255.0, gt=0)
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3


class EmbeddingSpec(_Strict):
    output_name: str = "embedding"
    dim: int = Field(gt=0, le=65536)
    # The ONNX graph outputs raw features; the service (and centers.npy) use their L2-normalised form.
    normalization: Literal["l2"] = "l2"
    metric: Literal["cosine"] = "cosine"


class OperatingPoint(_Strict):
    """A cosine-similarity threshold and what it measured on pairs of identities unseen in training."""

    threshold: float = Field(ge=-1.0, le=1.0)
    far: float = Field(ge=0.0, le=1.0)
    tar: float = Field(ge=0.0, le=1.0)


class Interval(_Strict):
    """A two-sided confidence interval of a rate."""

    low: float = Field(ge=0.0, le=1.0)
    high: float = Field(ge=0.0, le=1.0)


class CheckedPoint(_Strict):
    """A threshold chosen elsewhere, measured on pairs of identities that took no part in choosing it."""

    threshold: float = Field(ge=-1.0, le=1.0)
    far: float = Field(ge=0.0, le=1.0)
    tar: float = Field(ge=0.0, le=1.0)
    far_interval: Interval
    tar_interval: Interval


class OutOfSampleCheck(_Strict):
    """The calibrated thresholds on the held-out TEST identities (disjoint from the calibration ones)."""

    num_identities: int = Field(ge=2)
    num_genuine_pairs: int = Field(ge=1)
    num_impostor_pairs: int = Field(ge=1)
    confidence: float = Field(gt=0.0, lt=1.0)
    # identity-bootstrap: the identities resampled with replacement (pairs that share an identity are not
    # independent); clopper-pearson: exact binomial on pair counts, far narrower than the truth.
    interval_method: Literal["identity-bootstrap", "clopper-pearson"] = "identity-bootstrap"
    at_default: CheckedPoint
    at_eer: CheckedPoint


class Thresholds(_Strict):
    """Decision thresholds, chosen on pairs of held-out CALIBRATION identities (never trained on).

    `at_target_far`, `eer` and the pair counts describe the calibration pairs the thresholds were chosen on;
    `out_of_sample` is what the same thresholds measured on other held-out identities (what users get).
    """

    default: float = Field(ge=-1.0, le=1.0, description="similarity >= default means 'same identity'")
    target_far: float = Field(gt=0.0, lt=1.0)
    at_target_far: OperatingPoint
    eer: OperatingPoint
    num_genuine_pairs: int = Field(ge=1)
    num_impostor_pairs: int = Field(ge=1)
    calibration_identities: int | None = Field(default=None, ge=2)
    out_of_sample: OutOfSampleCheck | None = None


# The center-update rules by name (training/center_rules.py says what each does); defined here, in the
# contract a manifest is checked against, and nowhere else.
CenterUpdateRule = Literal["paper", "facenet", "gradient", "none"]


class TrainingRecipe(_Strict):
    backbone: str
    head: str = "softmax"
    head_params: dict[str, float] = Field(default_factory=dict)
    center_update: CenterUpdateRule
    center_lambda: float = Field(ge=0.0)
    center_alpha: float = Field(gt=0.0, le=1.0)
    # 0: not trained here (an imported model, see `BundleManifest.provenance`).
    epochs: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    seed: int
    dataset: str
    train_classes: list[str]
    heldout_classes: list[str]
    val_fraction: float = Field(ge=0.0, lt=1.0)
    # Every other option of the training run (feature dim, width, lr, optimizer, input size, ...), so the
    # recipe can be re-run exactly; free-form because each trainer has its own knobs.
    options: dict[str, float | int | str | bool | None] = Field(default_factory=dict)


class FileDigest(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Provenance(_Strict):
    """Where a model not trained by idembed came from (`idembed-train import`)."""

    kind: Literal["imported"] = "imported"
    source_file: str = Field(min_length=1)
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    source_bytes: int = Field(ge=0)
    original_input_name: str
    original_output_name: str
    # Graph shapes as the source file declared them (symbolic dims by name), e.g. ["N", 3, 112, 112].
    original_input_shape: list[int | str]
    original_output_shape: list[int | str]
    opset: int | None = None
    producer: str = ""
    # What import changed in the graph (e.g. a fixed batch axis made dynamic); empty: served byte for byte.
    changes: list[str] = Field(default_factory=list)


class Quantization(_Strict):
    """model.onnx is an int8 version of an fp32 graph, accepted because its held-out EER stayed in bounds and
    its embeddings stayed close to the fp32 graph's."""

    method: Literal["dynamic-int8", "static-int8"]
    weight_type: Literal["int8", "uint8"] = "int8"
    # 7: weights in 7 bits, so onnxruntime's int8 products cannot saturate on CPUs without VNNI and every CPU
    # computes what the gate measured (training/quantize.py). Absent (bundles made before it): 8 bits, whose
    # products saturate on AVX2/AVX512BW-only CPUs.
    weight_bits: Literal[7, 8] | None = None
    fp32_eer: float = Field(ge=0.0, le=1.0)
    int8_eer: float = Field(ge=0.0, le=1.0)
    max_eer_increase: float = Field(ge=0.0)
    fp32_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    fp32_bytes: int = Field(ge=0)
    # Held-out images both models embedded for the gate.
    num_images: int = Field(ge=1)
    # The fidelity gate (absent in bundles made before it): mean cosine of the int8 and fp32 embeddings of
    # those images, and the least it had to be.
    mean_cosine_to_fp32: float | None = Field(None, ge=-1.0, le=1.0)
    min_mean_cosine: float | None = Field(None, ge=-1.0, le=1.0)
    # Raw onnxruntime throughput of both graphs on one batch of those images, on the machine that quantized
    # (what int8 bought there; the serving machine's figure can differ). Absent in older bundles.
    fp32_images_per_s: float | None = Field(None, ge=0.0)
    int8_images_per_s: float | None = Field(None, ge=0.0)
    speed_measured_on: str | None = Field(None, max_length=200)


class BundleManifest(_Strict):
    schema_version: Literal[1, 2, 3, 4] = SCHEMA_VERSION
    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    created_at: str
    input: InputSpec
    preprocessing: Preprocessing
    embedding: EmbeddingSpec
    num_classes: int = Field(ge=1)
    thresholds: Thresholds
    training: TrainingRecipe
    # Free-form but numeric: open-set metrics of this model and its baselines (see training/evaluate).
    evaluation: dict[str, float | int | str | dict[str, float | int | str]] = Field(default_factory=dict)
    files: dict[str, FileDigest]
    tool_versions: dict[str, str] = Field(default_factory=dict)
    provenance: Provenance | None = None
    quantization: Quantization | None = None

    @model_validator(mode="after")
    def _consistent(self) -> BundleManifest:
        if self.input.dtype == "uint8" and self.schema_version < 4:
            raise ValueError(f"input.dtype uint8 needs schema_version 4, got {self.schema_version}")
        if self.preprocessing.channels != self.input.channels:
            raise ValueError(
                f"preprocessing.color_mode={self.preprocessing.color_mode!r} gives "
                f"{self.preprocessing.channels} channel(s) but input.channels={self.input.channels}"
            )
        if self.preprocessing.color_mode == "L" and self.preprocessing.channel_order != "RGB":
            raise ValueError("preprocessing.channel_order=BGR needs color_mode RGB (3 channels)")
        for field in ("mean", "std"):
            n = len(getattr(self.preprocessing, field))
            if n not in (1, self.input.channels):
                raise ValueError(f"preprocessing.{field} has {n} values; expected 1 or {self.input.channels}")
        missing = [f for f in REQUIRED_FILES if f not in self.files]
        if missing:
            raise ValueError(f"files is missing the digest of {', '.join(missing)}")
        return self

    @property
    def model_id(self) -> str:
        return f"{self.name}:{self.version}"
