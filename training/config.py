"""The config models: RunConfig (every training option, one pydantic model, validated before data is read or a
model built) and EvaluationSettings (the open-set protocol's knobs). The CLI takes its option defaults and
help texts from them (training/cli.py), so each default is written here and nowhere else."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bundle.manifest import CenterUpdateRule
from training.center_rules import DEFAULT_ALPHA

BACKBONES = (
    "lenetpp",
    "facecnn",
    "conv4",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "mobilefacenet",
)
# issue 13: arcface_torch backbones (training/face_backbones.py), mixed precision, Partial FC.
FACE_BACKBONES = ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet")
PRECISIONS = ("fp32", "mixed_bfloat16", "mixed_float16")
PARTIAL_FC_HEADS = ("arcface", "amsoftmax", "combined")
OPTIMIZERS = ("adam", "sgd")

# The CLI spells some fields differently; errors name the option the user actually typed.
CLI_OPTION_NAMES = {
    "center_lambda": "--lambda",
    "alpha": "--alpha",
    "rule": "--rule",
    "center_lr": "--center-lr",
    "heldout_classes": "--heldout-classes",
    "heldout_count": "--heldout-count",
    "heldout_fraction": "--heldout-fraction",
    "head_params": "--margin/--scale",
    "heldout_groups": "--heldout-groups",
    "heldout_group_count": "--heldout-group-count",
}

# Fill of the pixels an augmentation warp brings in from outside the image (see `RunConfig.augment_fill`).
AUGMENT_FILL_MODES = ("nearest", "reflect", "wrap")


class ConfigError(ValueError):
    """An invalid option; the message names the option (as typed on the command line) and what is allowed."""


class RunConfig(BaseModel):
    """A training run, fully described; saved as `config.json` in the run folder and reloaded on resume."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # data
    dataset: str = Field(
        default="digits",
        description="'digits' (bundled sklearn digits), 'digit-pairs' (100 identities built from them), an "
        "IDX folder/prefix (MNIST format), an image folder with one sub-folder per identity (or "
        "<group>/<identity>/), one .zip of such a tree, a folder of .zip files pooled into one dataset "
        "(training/data/grouped.py), an insightface train.rec (with train.idx), or a folder of TFRecord "
        "shards written by `idembed-train pack`",
    )
    image_size: int | None = Field(
        default=None,
        gt=0,
        le=1024,
        description="square model input size; default: the dataset's own size (8 digits, 28 IDX), "
        "else 28 for lenetpp and 96 for facecnn",
    )
    color_mode: Literal["L", "RGB"] = Field(default="L", description="L = grayscale, RGB = 3 channels")
    heldout_classes: list[str] | None = Field(
        default=None, description="identities held out of training (open-set evaluation), by name"
    )
    heldout_count: int | None = Field(default=None, ge=0, description="hold out this many random identities")
    heldout_fraction: float = Field(
        default=0.3,
        ge=0.0,
        lt=1.0,
        description="fraction of identities held out when neither names nor a count are given",
    )
    heldout_groups: list[str] | None = Field(
        default=None,
        description="hold out every identity of these groups (e.g. Omniglot alphabets); needs a dataset "
        "with a group level",
    )
    heldout_group_count: int | None = Field(
        default=None, ge=1, description="hold out every identity of this many groups, chosen by seed"
    )
    val_fraction: float = Field(
        default=0.15, ge=0.0, lt=1.0, description="per-identity validation fraction of training identities"
    )
    # training-only augmentation (training/data/augment.py): a seeded random affine warp per training image
    augment_rotation: float = Field(
        default=0.0, ge=0.0, le=180.0, description="max rotation in degrees (uniform in [-r, r]); 0 = off"
    )
    augment_shear: float = Field(
        default=0.0, ge=0.0, le=60.0, description="max horizontal shear angle in degrees; 0 = off"
    )
    augment_scale: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="zoom in [1 - s, 1 + s] (0.1 = 0.9..1.1); 0 = off"
    )
    augment_translate: float = Field(
        default=0.0, ge=0.0, le=0.5, description="max shift as a fraction of the image size, per axis"
    )
    augment_flip: bool = Field(
        default=False,
        description="random horizontal flips (off: a mirrored character or face may be another identity)",
    )
    augment_fill: str = Field(
        default="nearest",
        description="pixels warped in from outside: nearest | reflect | wrap (edge modes) or a constant "
        "pixel value 0..255 (255 = white paper)",
    )
    # --- streaming input and pair verification (training/data/streaming.py, training/verification_bin.py)
    streaming: bool = Field(
        default=False,
        description="stream an identity folder from disk (listed once, decoded per batch) instead of loading "
        "it into memory; .rec files and TFRecord shard folders always stream",
    )
    shuffle_buffer: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="streamed TFRecord records are shuffled in seeded blocks of this many",
    )
    deterministic: bool = Field(
        default=True, description="streamed input keeps its order through parallel decoding (reproducible)"
    )
    verify_pairs: list[str] = Field(
        default_factory=list, description="insightface .bin pair files verified during training"
    )
    verify_every: int = Field(
        default=0, ge=0, description="verify --verify-pairs every N training steps (0 = at each epoch end)"
    )
    # --- end streaming input and pair verification
    # model
    backbone: Literal[BACKBONES] = "lenetpp"
    feature_dim: int = Field(default=32, ge=1, le=4096, description="embedding size (2 for plots)")
    width: int = Field(default=32, ge=1, le=512, description="filters of the first conv stage")
    head: str = Field(default="softmax", min_length=1)
    head_params: dict[str, float] = Field(default_factory=dict)
    # issue 13: precision of the backbone; Partial FC (sampled class weights) when sample_rate is set
    precision: Literal[PRECISIONS] = Field(
        default="fp32", description="backbone compute dtype (head, centers and losses stay float32)"
    )
    sample_rate: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Partial FC: per step the batch's classes plus a seeded sample of the others, "
        "max(rate * K, positives) in all; None = the full head",
    )
    # issue 13: model-parallel Partial FC (training/sharded_fc.py)
    shard_classes: bool = Field(
        default=False,
        description="Partial FC: split the class weights, their optimizer slots and the centers by class "
        "range over the replicas (workers), each storing K / W rows; needs sample_rate",
    )
    # center loss
    center_lambda: float = Field(default=0.01, ge=0.0, description="weight of the center loss; 0 = softmax")
    alpha: float = Field(
        default=DEFAULT_ALPHA["paper"],
        gt=0.0,
        le=1.0,
        description="center update rate (facenet: its alfa); not given: the rule's own default "
        f"({', '.join(f'{r} {a:g}' for r, a in DEFAULT_ALPHA.items() if r in ('paper', 'facenet'))})",
    )
    rule: CenterUpdateRule = "paper"
    center_lr: float = Field(default=0.5, gt=0.0, description="learning rate of the `gradient` rule")
    # optimisation
    epochs: int = Field(default=20, ge=1, le=100000)
    batch_size: int = Field(default=64, ge=2, le=65536)
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    optimizer: Literal[OPTIMIZERS] = "adam"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    @model_validator(mode="before")
    @classmethod
    def _rule_default_alpha(cls, data: object) -> object:
        # A rule's own rate when --alpha is not given (facenet's alfa 0.95 vs the paper's 0.5): using one
        # number for both made `--rule facenet` diverge by default.
        if isinstance(data, dict) and data.get("alpha") is None and data.get("rule") in DEFAULT_ALPHA:
            return {**data, "alpha": DEFAULT_ALPHA[data["rule"]]}
        return data

    @field_validator("head")
    @classmethod
    def _known_head(cls, v: str) -> str:
        from training.heads import HEADS

        if v not in HEADS:
            raise ValueError(f"unknown head {v!r}; choose one of {', '.join(sorted(HEADS))}")
        return v

    @field_validator("heldout_classes", "heldout_groups")
    @classmethod
    def _unique_names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        names = [s.strip() for s in v]
        if any(not s for s in names):
            raise ValueError("names must be non-empty (check for a stray comma)")
        if len(set(names)) != len(names):
            raise ValueError("names are repeated")
        return names

    @field_validator("heldout_groups")
    @classmethod
    def _no_comma(cls, v: list[str] | None) -> list[str] | None:
        # A bundle's recipe stores the groups comma-joined (its options are scalars).
        if v is not None and any("," in g for g in v):
            raise ValueError("group names cannot contain ','")
        return v

    @field_validator("augment_fill")
    @classmethod
    def _fill(cls, v: str) -> str:
        if v in AUGMENT_FILL_MODES:
            return v
        try:
            value = float(v)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 255.0:
            raise ValueError(f"{v!r}: choose {', '.join(AUGMENT_FILL_MODES)} or a pixel value 0..255")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset_exists(cls, v: str) -> str:
        if v in ("digits", "digit-pairs"):
            return v
        path = Path(v)
        # An IDX prefix such as `.../train` names files that start with it rather than a path that exists.
        if not path.exists() and not any(path.parent.glob(path.name + "-*")):
            raise ValueError(f"{v!r} is neither 'digits', an existing folder, nor an IDX file prefix")
        return v

    @field_validator("verify_pairs")
    @classmethod
    def _pair_files_exist(cls, v: list[str]) -> list[str]:
        for f in v:
            if not Path(f).is_file():
                raise ValueError(f"{f!r}: no such pair file (insightface .bin, e.g. lfw.bin)")
        return v

    @model_validator(mode="after")
    def _streaming_source(self) -> RunConfig:
        if self.streaming and (self.dataset == "digits" or not Path(self.dataset).is_dir()):
            raise ValueError("--streaming reads an identity folder; .rec and TFRecord shards always stream")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.heldout_classes is not None and self.heldout_count is not None:
            raise ValueError("give --heldout-classes or --heldout-count, not both")
        by_group = [
            o
            for o, v in (
                ("--heldout-groups", self.heldout_groups),
                ("--heldout-group-count", self.heldout_group_count),
            )
            if v is not None
        ]
        if len(by_group) == 2:
            raise ValueError("give --heldout-groups or --heldout-group-count, not both")
        by_class = [
            o
            for o, v in (("--heldout-classes", self.heldout_classes), ("--heldout-count", self.heldout_count))
            if v is not None
        ]
        if by_group and by_class:
            raise ValueError(
                f"{by_group[0]} holds out whole groups; it cannot be combined with {by_class[0]}"
            )
        if self.rule == "none" and self.center_lambda > 0:
            raise ValueError("--rule none keeps centers at zero; it needs --lambda 0 (softmax only)")
        if self.backbone == "lenetpp" and self.image_size is not None and self.image_size < 8:
            raise ValueError("--image-size must be >= 8 for lenetpp (three 2x2 poolings)")
        # issue 13
        if self.backbone in FACE_BACKBONES and self.image_size is not None and self.image_size % 16:
            raise ValueError(
                f"--image-size must be a multiple of 16 for {self.backbone} (112 as arcface_torch)"
            )
        if self.precision != "fp32" and self.backbone not in FACE_BACKBONES:
            raise ValueError(
                f"--precision {self.precision} needs one of {', '.join(FACE_BACKBONES)} (their embedding "
                "layer computes in float32)"
            )
        if self.shard_classes and self.sample_rate is None:
            raise ValueError("--shard-classes splits the Partial FC head: give --sample-rate too (1.0 = all)")
        if self.sample_rate is not None and self.head not in PARTIAL_FC_HEADS:
            raise ValueError(
                f"--sample-rate (Partial FC) needs a margin head on normalised weights: "
                f"--head {' | '.join(PARTIAL_FC_HEADS)}"
            )
        return self

    @classmethod
    def from_options(cls, **options: object) -> RunConfig:
        """Validate options; a `ConfigError` names each bad option as the CLI spells it."""
        try:
            return cls.model_validate(options)
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc)) from exc

    @classmethod
    def load(cls, path: Path | str) -> RunConfig:
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: missing (is this a run folder?)") from None
        except ValidationError as exc:
            raise ConfigError(f"{path}: {describe_errors(exc)}") from exc


def option_name(field: str) -> str:
    """The command-line spelling of a RunConfig field (`center_lambda` -> `--lambda`)."""
    return CLI_OPTION_NAMES.get(field, "--" + field.replace("_", "-"))


def describe_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{option_name(loc[0])}: {msg}" if loc else msg)
    return "; ".join(parts)


# ------------------------------------------------------------ export defaults (the CLI shows them as is)

# FAR the default threshold is calibrated for.
DEFAULT_TARGET_FAR = 1e-3


def check_target_far(target_far: float) -> float:
    """`--target-far` (or a recipe's `target_far`) before anything is trained or embedded."""
    if not 0.0 < target_far < 1.0:
        raise ConfigError(f"--target-far must be in (0, 1), got {target_far:g}")
    return target_far


# Largest |Keras - ONNX| feature difference the export parity check allows.
PARITY_TOLERANCE = 1e-4
# int8 (training/quantize.py): the accuracy gate (absolute held-out EER it may cost), the methods, and the
# training-identity images static quantization reads activation ranges from.
MAX_EER_INCREASE = 0.005
# ... and the fidelity gate: the int8 model's embeddings of the held-out images must stay this close to
# the fp32 model's (mean cosine). An EER gate alone passes a quantized graph that computes another function
# if that function happens to score as well: measured on a MobileFaceNet trained on digits, an int8 graph
# that had turned every PReLU into a ReLU scored EER 0.290 against fp32's 0.300 at a mean cosine of 0.68
# (training/graph_rewrite.py fixed that graph: 0.993).
MIN_INT8_MEAN_COSINE = 0.98
QUANTIZE_METHODS = ("static", "dynamic")
DEFAULT_QUANTIZE_METHOD = "static"
CALIBRATION_IMAGES = 128


# --------------------------------------------------------------------------------- the evaluation protocol

DEFAULT_FARS: tuple[float, ...] = (1e-1, 1e-2, 1e-3)


# The EvaluationSettings fields `evaluate` and `export` take as options (training/cli.py
# `evaluation_options`): field -> (command-line name, help). Defaults are the dataclass's.
EVALUATION_CLI: dict[str, tuple[str, str]] = {
    "max_genuine": (
        "max_genuine",
        "genuine pairs: all of them when fewer, else a seeded sample of this many",
    ),
    "max_impostor": (
        "max_impostor",
        "impostor pairs: all of them when fewer, else a seeded sample of this many",
    ),
    "folds": ("folds", "folds of the LFW-style accuracy (threshold chosen on k-1 folds)"),
    "min_errors": (
        "min_errors",
        "a FAR is reported only if the impostor count gives at least this many false accepts",
    ),
    "ident_trials": ("trials", "open-set identification trials (gallery image / unknowns drawn)"),
    "calibration_fraction": (
        "calibration_fraction",
        "share of the held-out identities that choose the thresholds; the rest measure them "
        "(0 = no out-of-sample calibration; export then refuses)",
    ),
    "episode_ways": ("ways", "N of the N-way K-shot episodes among held-out identities"),
    "episode_shots": ("shots", "K of the N-way K-shot episodes (support samples per identity)"),
    "episodes": ("episodes", "number of seeded episodes (0 = skip them)"),
    "episode_within_group": (
        "within_group",
        "draw each episode's identities from one group (e.g. one alphabet) when the data has them",
    ),
    "seed": ("eval_seed", "seed of the pair sample and the trials"),
}


@dataclass(frozen=True)
class EvaluationSettings:
    """Knobs of the open-set protocol; defaults work for the bundled digits and Fashion-MNIST splits."""

    max_genuine: int | None = 50_000
    max_impostor: int | None = 200_000
    fars: tuple[float, ...] = DEFAULT_FARS
    folds: int = 10
    min_errors: int = 1
    unknown_fraction: float = 0.3
    ident_fars: tuple[float, ...] = (1e-2, 1e-1)
    ident_trials: int = 10
    calibration_fraction: float = 0.5
    # Further seeded calibration/test splits whose results are reported as a spread (1 = only the main one).
    calibration_repeats: int = 5
    episode_ways: int = 20
    episode_shots: int = 1
    episodes: int = 400
    episode_within_group: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        # Messages use the CLI spelling of each option, so a user knows what to change.
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"{evaluation_option(name)} must be {rule}, got {getattr(self, name)}")

        for name in ("max_genuine", "max_impostor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise bad(name, ">= 1")
        if self.folds < 2:
            raise bad("folds", ">= 2")
        if self.min_errors < 1:
            raise bad("min_errors", ">= 1")
        if not 0.0 < self.unknown_fraction < 1.0:
            raise bad("unknown_fraction", "in (0, 1)")
        if self.ident_trials < 1:
            raise bad("ident_trials", ">= 1")
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise bad("calibration_fraction", "in [0, 1)")
        if self.calibration_repeats < 1:
            raise bad("calibration_repeats", ">= 1")
        if self.episode_ways < 2:
            raise bad("episode_ways", ">= 2")
        if self.episode_shots < 1:
            raise bad("episode_shots", ">= 1")
        if self.episodes < 0:
            raise bad("episodes", ">= 0 (0 = skip)")
        for far in (*self.fars, *self.ident_fars):
            if not 0.0 < far < 1.0:
                raise ConfigError(f"false-accept rates must be in (0, 1), got {far}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def evaluation_option(name: str) -> str:
    """The command-line spelling of an EvaluationSettings field (`ident_trials` -> `--trials`); a field only a
    recipe sets is spelled as its own name (`--calibration-repeats`)."""
    return "--" + EVALUATION_CLI.get(name, (name, ""))[0].replace("_", "-")


# ------------------------------------------------------------------- importing an existing ONNX model


@dataclass(frozen=True)
class ImportOptions:
    """`idembed-train import` (training/import_onnx.py): how to feed the model, which identities to hold out
    and what to write. Checked against the graph and the data by `import_model`."""

    model: Path
    dataset: str
    layout: str = "NCHW"
    height: int = 112
    width: int = 112
    channels: int = 3
    channel_order: str = "RGB"
    scale: float = 1.0
    mean: tuple[float, ...] = (127.5,)
    std: tuple[float, ...] = (127.5,)
    resample: str = "bilinear"
    output_name: str | None = None
    heldout_fraction: float = 0.3
    heldout_classes: tuple[str, ...] | None = None
    # Hold out every identity of these groups (or of this many, drawn by seed), as `train` does.
    heldout_groups: tuple[str, ...] | None = None
    heldout_group_count: int | None = None
    seed: int = 0
    target_far: float = DEFAULT_TARGET_FAR
    pca_components: int | None = None
    name: str = "imported"
    version: str = "1"
    quantize: str | None = None
    quantize_method: str = DEFAULT_QUANTIZE_METHOD
    # The served graph takes uint8 pixels and normalises them itself (training.export.add_preprocessing).
    embed_preprocessing: bool = False
    # training.graph_rewrite's exact rewrites (PReLU -> depthwise Conv + Relu), checked against the source
    # graph on the folder's images; off keeps the source graph node for node.
    rewrite_graph: bool = True
