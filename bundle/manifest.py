"""The bundle manifest: one pydantic schema, written by training/export and read by service/ (no TF)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# 2 added `Thresholds.calibration_identities` and `Thresholds.out_of_sample` (optional: v1 still loads).
SCHEMA_VERSION = 2

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
    """What the ONNX model takes: `[N, H, W, C]` (NHWC) or `[N, C, H, W]` (NCHW) float32, dynamic N."""

    name: str = "input"
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    channels: Literal[1, 3]
    dtype: Literal["float32"] = "float32"

    def shape(self, batch: int | None = None) -> tuple[int | None, int, int, int]:
        if self.layout == "NHWC":
            return (batch, self.height, self.width, self.channels)
        return (batch, self.channels, self.height, self.width)


class Preprocessing(_Strict):
    """How an image becomes a model input; `bundle.preprocess` is the one implementation of it.

    Steps, in order: decode -> convert to `color_mode` (Pillow) -> resize to (width, height) of the input with
    `resample` -> float32 -> `* scale` -> `(x - mean) / std` per channel -> layout.
    """

    color_mode: Literal["L", "RGB"]
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


class TrainingRecipe(_Strict):
    backbone: str
    head: str = "softmax"
    head_params: dict[str, float] = Field(default_factory=dict)
    center_update: Literal["paper", "facenet", "gradient", "none"]
    center_lambda: float = Field(ge=0.0)
    center_alpha: float = Field(gt=0.0, le=1.0)
    epochs: int = Field(ge=1)
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


class BundleManifest(_Strict):
    schema_version: Literal[1, 2] = SCHEMA_VERSION
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

    @model_validator(mode="after")
    def _consistent(self) -> BundleManifest:
        if self.preprocessing.channels != self.input.channels:
            raise ValueError(
                f"preprocessing.color_mode={self.preprocessing.color_mode!r} gives "
                f"{self.preprocessing.channels} channel(s) but input.channels={self.input.channels}"
            )
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
