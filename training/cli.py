"""`idembed-train`: the command-line face of training/ (a thin Typer layer over functions in the package)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

# Before anything can import TensorFlow: its C++ INFO lines (oneDNN, CPU features) are noise on a CLI. oneDNN
# itself stays on (turning it off would change the numbers of a seeded run).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import typer

# Only modules that do not import TensorFlow at the top: `--help` and option errors stay instant (~0.3 s
# instead of ~5 s). Each command imports what it runs (training.data and training.run pull in TensorFlow).
from bundle.host import int8_support
from bundle.manifest import Preprocessing, Quantization
from training.baselines import DEFAULT_PCA_COMPONENTS  # numpy only (sklearn is imported lazily)
from training.center_rules import DEFAULT_ALPHA, RULE_HELP
from training.config import (
    CALIBRATION_IMAGES,
    DEFAULT_QUANTIZE_METHOD,
    DEFAULT_TARGET_FAR,
    EVALUATION_CLI,
    MAX_EER_INCREASE,
    PARITY_TOLERANCE,
    QUANTIZE_METHODS,
    ConfigError,
    EvaluationSettings,
    ImportOptions,
    RunConfig,
)

app = typer.Typer(
    help="Train identity embeddings with softmax (or a margin head) + center loss, evaluate and export them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main() -> None:
    """Keeps `train` (and the commands added beside it) as explicit sub-commands."""
    if "--help" not in sys.argv[1:]:
        _import_tensorflow_quietly()


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with file descriptor 2 pointed at /dev/null: its C++ start-up lines (absl's "log
    messages before absl::InitializeLog()", oneDNN, CPU features) ignore TF_CPP_MIN_LOG_LEVEL in TF 2.21.
    An import error still raises, with its traceback printed once stderr is back."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


# RunConfig's defaults, which `train`'s options show and use (tests/training/test_cli_defaults.py pins them).
_RUN = {name: f.get_default(call_default_factory=True) for name, f in RunConfig.model_fields.items()}


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def _split_names(value: str | None) -> list[str] | None:
    return None if value is None else [s.strip() for s in value.split(",")]


# Training-only augmentation (training/data/augment.py), shared by `train` and `build-bundle`.
_AugRotation = Annotated[
    float, typer.Option(help="augmentation: max random rotation, degrees (0..180; 0 = off)")
]
_AugShear = Annotated[float, typer.Option(help="augmentation: max horizontal shear, degrees (0..60)")]
_AugScale = Annotated[
    float, typer.Option(help="augmentation: random zoom in [1-s, 1+s], e.g. 0.1 (0 <= s < 1)")
]
_AugTranslate = Annotated[
    float, typer.Option(help="augmentation: max shift per axis, fraction of the image size (0..0.5)")
]
_AugFlip = Annotated[
    bool, typer.Option(help="augmentation: random horizontal flips (off: mirroring can change identity)")
]
_AugFill = Annotated[
    str,
    typer.Option(
        help="augmentation: pixels warped in from outside: nearest | reflect | wrap | a pixel value 0..255"
    ),
]


# Held out by whole group (training/data/grouped.py), shared by `train` and `import`.
_HeldoutGroups = Annotated[
    str | None,
    typer.Option(
        help="comma-separated groups whose identities are all held out, e.g. Omniglot alphabets "
        "Korean,Tagalog (dataset needs <group>/<identity>/ folders); not with --heldout-classes/-count"
    ),
]
_HeldoutGroupCount = Annotated[
    int | None, typer.Option(help="hold out every identity of this many groups, chosen by seed")
]


def _augment_options(
    rotation: float, shear: float, scale: float, translate: float, flip: bool, fill: str
) -> dict[str, object]:
    return {
        "augment_rotation": rotation,
        "augment_shear": shear,
        "augment_scale": scale,
        "augment_translate": translate,
        "augment_flip": flip,
        "augment_fill": fill,
    }


@app.command()
def train(
    dataset: Annotated[
        str,
        typer.Option(
            help="'digits' (bundled), an IDX folder or prefix (MNIST format, .gz or raw), "
            "an image folder with one sub-folder per identity (or <group>/<identity>/), "
            "a .zip of such a tree, or a folder of .zip files (pooled, duplicates read once)"
        ),
    ] = _RUN["dataset"],
    out: Annotated[
        Path | None,
        typer.Option(help="run folder \\[default: runs/<dataset>-<backbone>-<rule>-lambda<L>-s<seed>]"),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="continue the run in --out from its last checkpoint (its saved options are used; "
            "only --epochs may change, to extend it)"
        ),
    ] = False,
    epochs: Annotated[
        int | None, typer.Option(help=f"epochs to train in total \\[default: {_RUN['epochs']}]")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="global batch size (split across replicas)")] = _RUN[
        "batch_size"
    ],
    lr: Annotated[float, typer.Option(help="learning rate of the feature/head optimizer")] = _RUN["lr"],
    optimizer: Annotated[str, typer.Option(help="adam | sgd (momentum 0.9)")] = _RUN["optimizer"],
    seed: Annotated[int, typer.Option(help="seed of weights, splits and batch order")] = _RUN["seed"],
    center_lambda: Annotated[
        float, typer.Option("--lambda", help="center-loss weight; 0 = softmax only (centers still tracked)")
    ] = _RUN["center_lambda"],
    alpha: Annotated[
        float | None,
        typer.Option(
            help="center update rate in (0, 1]; for --rule facenet it is facenet's alfa (centers move by "
            "1 - alfa per example) \\[default: the rule's own: "
            + ", ".join(f"{r} {DEFAULT_ALPHA[r]:g}" for r in ("paper", "facenet"))
            + "]"
        ),
    ] = None,
    rule: Annotated[
        str,
        typer.Option(
            help="center update: " + " | ".join(f"{rule} ({what})" for rule, what in RULE_HELP.items())
        ),
    ] = _RUN["rule"],
    center_lr: Annotated[
        float, typer.Option(help="learning rate of the centers with --rule gradient")
    ] = _RUN["center_lr"],
    backbone: Annotated[
        str,
        typer.Option(
            help="lenetpp (paper's toy CNN) | facecnn (face crops) | iresnet18/34/50/100 | mobilefacenet "
            "(arcface_torch, 112x112 RGB, 512-d)"
        ),
    ] = _RUN["backbone"],
    precision: Annotated[
        str,
        typer.Option(
            help="fp32 | mixed_bfloat16 (CPU) | mixed_float16 (GPU, loss-scaled): the backbone's compute "
            "dtype; head, centers and losses stay float32 (face backbones only)"
        ),
    ] = _RUN["precision"],
    sample_rate: Annotated[
        float | None,
        typer.Option(
            help="Partial FC: per step the batch's classes plus a seeded sample of the others, "
            "max(rate*K, positives) in all, for 100k+ classes (arcface | amsoftmax | combined) "
            "\\[default: full head]"
        ),
    ] = None,
    shard_classes: Annotated[
        bool,
        typer.Option(
            help="with --sample-rate: split the class weights, their optimizer slots and the centers by "
            "class range over the workers (model-parallel Partial FC; each stores K / workers rows)"
        ),
    ] = _RUN["shard_classes"],
    feature_dim: Annotated[int, typer.Option(help="embedding size (2 to plot features)")] = _RUN[
        "feature_dim"
    ],
    width: Annotated[int, typer.Option(help="filters of the first conv stage (doubles per stage)")] = _RUN[
        "width"
    ],
    head: Annotated[
        str, typer.Option(help="classification head (training only): softmax or a margin head")
    ] = _RUN["head"],
    margin: Annotated[
        float | None, typer.Option(help="margin of a margin head \\[default: the head's]")
    ] = None,
    scale: Annotated[
        float | None, typer.Option(help="scale of a margin head \\[default: the head's]")
    ] = None,
    head_option: Annotated[
        list[str] | None,
        typer.Option(
            help="any other head option as KEY=VALUE, repeatable (see docs/heads.md), e.g. "
            "easy_margin=true, lambda_min=0"
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="square input size \\[default: the dataset's (8 digits, 28 IDX), "
            "else 28 lenetpp, 96 facecnn, 112 iresnet/mobilefacenet]"
        ),
    ] = None,
    color_mode: Annotated[str, typer.Option(help="L (grayscale) | RGB")] = _RUN["color_mode"],
    heldout_classes: Annotated[
        str | None, typer.Option(help="comma-separated identities never trained on, e.g. 7,8,9")
    ] = None,
    heldout_count: Annotated[
        int | None, typer.Option(help="hold out this many identities, chosen by seed")
    ] = None,
    heldout_fraction: Annotated[
        float, typer.Option(help="fraction of identities held out when no names/count are given")
    ] = _RUN["heldout_fraction"],
    heldout_groups: _HeldoutGroups = None,
    heldout_group_count: _HeldoutGroupCount = None,
    val_fraction: Annotated[
        float, typer.Option(help="fraction of each training identity's images used for validation")
    ] = _RUN["val_fraction"],
    augment_rotation: _AugRotation = _RUN["augment_rotation"],
    augment_shear: _AugShear = _RUN["augment_shear"],
    augment_scale: _AugScale = _RUN["augment_scale"],
    augment_translate: _AugTranslate = _RUN["augment_translate"],
    augment_flip: _AugFlip = _RUN["augment_flip"],
    augment_fill: _AugFill = _RUN["augment_fill"],
    streaming: Annotated[
        bool,
        typer.Option(
            help="stream an identity folder from disk instead of loading it (.rec files and TFRecord "
            "shard folders always stream)"
        ),
    ] = _RUN["streaming"],
    shuffle_buffer: Annotated[
        int, typer.Option(help="streamed TFRecord records are shuffled in seeded blocks of this many")
    ] = _RUN["shuffle_buffer"],
    deterministic: Annotated[
        bool, typer.Option(help="streamed input keeps its order through parallel decoding (reproducible)")
    ] = _RUN["deterministic"],
    verify_pairs: Annotated[
        list[str] | None,
        typer.Option(
            help="insightface .bin pair file (lfw.bin, cfp_fp.bin, ...) verified during training, repeatable"
        ),
    ] = None,
    verify_every: Annotated[
        int, typer.Option(help="verify the --verify-pairs files every N steps (0 = at each epoch end)")
    ] = _RUN["verify_every"],
    quiet: Annotated[bool, typer.Option(help="one line per epoch instead of a progress bar")] = False,
    strategy: Annotated[
        str,
        typer.Option(
            help="auto (multiworker if a cluster is configured, mirrored if several GPUs, else default) "
            "| default | mirrored (all local GPUs) | multiworker (TF_CONFIG or --worker)"
        ),
    ] = "auto",
    worker: Annotated[
        list[str] | None,
        typer.Option(
            help="host:port of every worker, repeated, in the same order on every machine "
            "(builds TF_CONFIG; alternative to setting TF_CONFIG)"
        ),
    ] = None,
    worker_index: Annotated[
        int | None, typer.Option(help="this machine's position in the --worker list (0 = chief)")
    ] = None,
) -> None:
    """Train a model; write a run folder (config, checkpoints, history.csv, TensorBoard logs, final model)."""
    from training.data import DataError
    from training.distributed import DistributedConfigError, make_strategy, resolve_tf_config
    from training.heads import check_head_options, parse_head_options
    from training.run import RunError, RunPaths
    from training.trainer import default_run_dir
    from training.trainer import train as run_training

    try:
        if resume:
            if out is None:
                raise ConfigError("--resume needs --out (the run folder to continue)")
            saved = RunConfig.load(RunPaths(out).config)
            config = (
                saved
                if epochs is None
                else RunConfig.from_options(**{**saved.model_dump(), "epochs": epochs})
            )
        else:
            try:
                head_params = parse_head_options(head_option)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            head_params.update({k: v for k, v in (("margin", margin), ("scale", scale)) if v is not None})
            config = RunConfig.from_options(
                dataset=dataset,
                image_size=image_size,
                color_mode=color_mode,
                heldout_classes=_split_names(heldout_classes),
                heldout_count=heldout_count,
                heldout_fraction=heldout_fraction,
                heldout_groups=_split_names(heldout_groups),
                heldout_group_count=heldout_group_count,
                val_fraction=val_fraction,
                **_augment_options(
                    augment_rotation,
                    augment_shear,
                    augment_scale,
                    augment_translate,
                    augment_flip,
                    augment_fill,
                ),
                backbone=backbone,
                precision=precision,
                sample_rate=sample_rate,
                shard_classes=shard_classes,
                feature_dim=feature_dim,
                width=width,
                head=head,
                head_params=head_params,
                center_lambda=center_lambda,
                alpha=alpha,
                rule=rule,
                center_lr=center_lr,
                epochs=_RUN["epochs"] if epochs is None else epochs,
                batch_size=batch_size,
                lr=lr,
                optimizer=optimizer,
                seed=seed,
                streaming=streaming,
                shuffle_buffer=shuffle_buffer,
                deterministic=deterministic,
                verify_pairs=verify_pairs or [],
                verify_every=verify_every,
            )
        try:
            check_head_options(config.head, config.head_params)
        except ValueError as exc:
            raise ConfigError(f"--head {config.head}: {exc}") from exc
        # The cluster is checked and the strategy built before any data is read or TensorFlow op runs
        # (multi-worker training must start its server first).
        cluster = resolve_tf_config(worker, worker_index)
        dist = make_strategy(strategy, cluster)
        run_dir = run_training(
            config,
            out or default_run_dir(config),
            resume=resume,
            strategy=dist,
            verbose=2 if quiet else 1,
        )
    except (ConfigError, DataError, RunError, DistributedConfigError) as exc:
        raise _fail(str(exc)) from exc
    except Exception as exc:
        # A streamed record found bad mid-epoch reaches us as a TensorFlow error wrapping RecordIOError.
        from training.data.streaming import stream_error_message

        message = stream_error_message(exc)
        if message is None:
            raise
        raise _fail(message) from exc
    if cluster is not None and not cluster.is_chief:
        typer.echo(f"worker {cluster.task.type}:{cluster.task.index} done; the chief writes {run_dir}")
        return
    summary = json.loads(RunPaths(run_dir).summary.read_text())
    typer.echo(f"run folder: {run_dir}")
    typer.echo("final: " + ", ".join(f"{k}={v:.4f}" for k, v in summary["final"].items()))


# --- evaluation, export and the one-command bundle builder (training/workflows/ does the work) -----------

_Pca = Annotated[int, typer.Option(help="components of the PCA-on-pixels baseline (0 = skip it)")]
_TargetFar = Annotated[
    float, typer.Option(help="FAR the default threshold is calibrated for (raised to the lowest resolvable)")
]


_Quantize = Annotated[
    str | None,
    typer.Option(
        help="int8: also quantize the model (onnxruntime); refused unless the held-out EER stays within "
        f"+{MAX_EER_INCREASE:g} of fp32"
    ),
]
_QuantizeMethod = Annotated[
    str,
    typer.Option(
        help=f"static (QDQ, activation ranges from {CALIBRATION_IMAGES} training-identity images) | dynamic "
        "(weights only)"
    ),
]


def _evaluation_help(name: str) -> str:
    """The help text of an EvaluationSettings field, as the config model writes it."""
    return EVALUATION_CLI[name][1]


# The protocol options `evaluate` and `export` take: (field, option name, help), their defaults taken from
# the config model (training/config.py), never restated.
EVALUATION_OPTIONS = tuple(
    (f, *EVALUATION_CLI[f.name]) for f in dataclasses.fields(EvaluationSettings) if f.name in EVALUATION_CLI
)


def evaluation_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the protocol options and pass them to it as one `settings: EvaluationSettings`.

    The command declares `settings: EvaluationSettings` last; the wrapper Typer sees has, instead of it, one
    option per `EVALUATION_OPTIONS` field. Values out of range are refused (exit 2) before the command runs.
    """
    signature = inspect.signature(command, eval_str=True)
    own = [p for name, p in signature.parameters.items() if name != "settings"]
    added = [
        inspect.Parameter(
            cli,
            inspect.Parameter.KEYWORD_ONLY,
            default=f.default,
            annotation=Annotated[type(f.default), typer.Option(help=help_text)],
        )
        for f, cli, help_text in EVALUATION_OPTIONS
    ]

    @functools.wraps(command)
    def wrapper(**options: object) -> None:
        values = {f.name: options.pop(cli) for f, cli, _ in EVALUATION_OPTIONS}
        try:
            settings = EvaluationSettings(**values)
        except ConfigError as exc:
            raise _fail(str(exc)) from exc
        command(**options, settings=settings)

    wrapper.__signature__ = signature.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
    return wrapper


def _user_errors() -> tuple[type[Exception], ...]:
    """What the commands report as `error: ...` (exit 2): input the user can fix, each naming the
    option or file at fault. Anything else (a bug) keeps its traceback."""
    from bundle.errors import BundleError
    from training.data import DataError
    from training.distributed import DistributedConfigError
    from training.evaluate import EvaluationError
    from training.export import ExportError
    from training.import_onnx import ModelImportError
    from training.quantize import QuantizationError
    from training.recipes import RecipeError
    from training.run import RunError

    return (
        ConfigError,
        DataError,
        RunError,
        BundleError,
        ExportError,
        EvaluationError,
        QuantizationError,
        ModelImportError,
        RecipeError,
        DistributedConfigError,
    )


@app.command()
@evaluation_options
def evaluate(
    run: Annotated[Path, typer.Argument(help="finished run folder (from `idembed-train train`)")],
    softmax_run: Annotated[
        Path | None,
        typer.Option(help="softmax-only baseline run [default: <RUN>-softmax, trained if absent]"),
    ] = None,
    softmax: Annotated[bool, typer.Option(help="include the softmax-only baseline")] = True,
    pca_components: _Pca = DEFAULT_PCA_COMPONENTS,
    json_out: Annotated[Path | None, typer.Option("--json", help="[default: <RUN>/evaluation.json]")] = None,
    roc: Annotated[Path | None, typer.Option(help="ROC curve PNG [default: <RUN>/roc.png]")] = None,
    pairs: Annotated[
        list[Path] | None,
        typer.Option(
            help="insightface .bin pair file (lfw.bin, cfp_fp.bin, agedb_30.bin), repeatable: report its "
            "10-fold accuracy as insightface does, instead of the held-out comparison"
        ),
    ] = None,
    flip: Annotated[
        bool,
        typer.Option(help="with --pairs: also embed mirrored images and add (insightface's Accuracy-Flip)"),
    ] = True,
    *,
    settings: EvaluationSettings,
) -> None:
    """Open-set metrics of a run on its held-out identities, beside softmax-only and PCA baselines."""
    from training.plots import plot_roc
    from training.run import RunPaths, load_run
    from training.workflows.compare import compare
    from training.workflows.report import markdown_table, roc_title
    from training.workflows.runs import ensure_run, softmax_twin, twin_dir

    if pairs:
        _evaluate_pairs(run, pairs, flip=flip, json_out=json_out)
        return
    try:
        trained = load_run(run)
        baseline = None
        if softmax and trained.config.center_lambda > 0:
            twin = softmax_run or twin_dir(run)
            if softmax_run is None and not RunPaths(twin).embedding.is_file():
                took = json.loads(RunPaths(run).summary.read_text()).get("seconds", "?")
                typer.echo(
                    f"training the lambda-0 twin of {run} in {twin} (same options, center loss off): the "
                    f"baseline of the EER ratio; about as long as the run took ({took} s). "
                    "--no-softmax skips it, --softmax-run DIR reuses one.",
                    err=True,
                )
                started = time.perf_counter()
                ensure_run(softmax_twin(trained.config), twin)
                typer.echo(f"twin trained in {time.perf_counter() - started:.0f} s", err=True)
            elif softmax_run is None:
                typer.echo(f"reusing the finished lambda-0 twin in {twin}", err=True)
            baseline = load_run(twin)
        result = compare(trained, softmax=baseline, settings=settings, pca_components=pca_components)
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    json_out = json_out or RunPaths(run).root / "evaluation.json"
    json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    roc_path = plot_roc(
        result.roc_curves(), roc or RunPaths(run).root / "roc.png", title=roc_title(result.dataset)
    )
    typer.echo(markdown_table(result))
    typer.echo(f"wrote {json_out} and {roc_path}")


def _evaluate_pairs(run: Path, pairs: list[Path], *, flip: bool, json_out: Path | None) -> None:
    """`evaluate RUN --pairs FILE.bin ...`: insightface's verification protocol on each pair file."""
    from training.data import DataError
    from training.run import RunPaths, load_run
    from training.verification_bin import pairs_table, verify_run

    try:
        for f in pairs:
            if not f.is_file():
                raise DataError(f"--pairs {f}: no such file")
        results = verify_run(load_run(run), pairs, flip=flip)
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    json_out = json_out or RunPaths(run).root / "verification.json"
    json_out.write_text(
        json.dumps({"run": str(run), "results": [r.as_dict() for r in results]}, indent=2) + "\n"
    )
    typer.echo(pairs_table(results))
    typer.echo(f"wrote {json_out}")


@app.command()
def pack(
    folder: Annotated[Path, typer.Argument(help="identity folder: one sub-folder of images per identity")],
    out: Annotated[Path, typer.Option(help="folder to write (must be absent or empty)")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="tfrecord (shards + idembed-shards.json) | rec (insightface train.rec + train.idx)",
        ),
    ] = "tfrecord",
    shard_size: Annotated[int, typer.Option(min=1, help="images per TFRecord shard")] = 10_000,
    seed: Annotated[int, typer.Option(help="seed of the image order across shards (tfrecord)")] = 0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Pack an identity folder into TFRecord shards or an insightface .rec/.idx (image bytes unchanged)."""
    from training.data import DataError
    from training.data.packing import pack_folder

    try:
        written = pack_folder(folder, out, fmt=fmt, shard_size=shard_size, seed=seed, progress=progress)
    except (DataError, OSError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(written)


@app.command()
@evaluation_options
def export(
    run: Annotated[Path, typer.Argument(help="finished run folder (from `idembed-train train`)")],
    out: Annotated[Path, typer.Option(help="bundle folder to write (replaced atomically)")],
    softmax_run: Annotated[
        Path | None,
        typer.Option(help="softmax-only run for the manifest figures [default: <RUN>-softmax if any]"),
    ] = None,
    target_far: _TargetFar = DEFAULT_TARGET_FAR,
    name: Annotated[str, typer.Option(help="model name in the manifest")] = "idembed",
    version: Annotated[str, typer.Option(help="model version in the manifest")] = "1",
    tolerance: Annotated[
        float, typer.Option(help="max |Keras - ONNX| allowed by the parity check")
    ] = PARITY_TOLERANCE,
    pca_components: _Pca = DEFAULT_PCA_COMPONENTS,
    quantize: _Quantize = None,
    quantize_method: _QuantizeMethod = DEFAULT_QUANTIZE_METHOD,
    embed_preprocessing: Annotated[
        bool,
        typer.Option(
            help="the ONNX model takes uint8 pixels (decoded, resized) and normalises them itself "
            "(manifest input.dtype uint8); the service then skips its numpy normalisation"
        ),
    ] = False,
    *,
    settings: EvaluationSettings,
) -> None:
    """Calibrate thresholds on the held-out identities; write the run as a bundle (ONNX, parity-checked)."""
    from training.run import RunPaths, load_run
    from training.workflows.compare import compare
    from training.workflows.export_run import export_run
    from training.workflows.runs import twin_dir

    try:
        trained = load_run(run)
        twin = softmax_run or twin_dir(run)
        has_twin = trained.config.center_lambda > 0 and RunPaths(twin).embedding.is_file()
        baseline = load_run(twin) if has_twin else None
        result = compare(trained, softmax=baseline, settings=settings, pca_components=pca_components)
        manifest = export_run(
            trained,
            out,
            result,
            target_far=target_far,
            name=name,
            version=version,
            tolerance=tolerance,
            quantize=quantize,
            quantize_method=quantize_method,
            embed_preprocessing=embed_preprocessing,
        )
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    if manifest.quantization is not None:
        qr = manifest.quantization
        typer.echo(
            f"int8 ({qr.method}): held-out EER {qr.int8_eer:.4f} vs fp32 {qr.fp32_eer:.4f}; "
            f"mean cosine to fp32 {qr.mean_cosine_to_fp32:.4f}; {_int8_speed(qr)}"
        )
    th = manifest.thresholds
    typer.echo(
        f"bundle {out}: {manifest.model_id}, dim {manifest.embedding.dim}, {manifest.num_classes} classes; "
        f"threshold {th.default:.4f} (FAR {th.at_target_far.far:.2g}, TAR {th.at_target_far.tar:.3f}), "
        f"EER threshold {th.eer.threshold:.4f}"
    )


def _int8_speed(q: Quantization) -> str:
    """What int8 bought on this machine, and why it may buy less here than elsewhere (bundle/host.py)."""
    line = f"raw onnxruntime here {q.int8_images_per_s:.0f} vs {q.fp32_images_per_s:.0f} img/s"
    support = int8_support()
    if support.dot_product is False:
        line += (
            f" (this CPU's int8 is {support}: no single-instruction int8 dot product, so int8 gains less"
            " here than on a CPU with VNNI, AMX or SDOT; docs/performance.md#int8-models)"
        )
    return line


def _given(**options: object) -> dict[str, object]:
    return {k: v for k, v in options.items() if v is not None}


@app.command("build-bundle")
def build_bundle(
    recipe: Annotated[
        str,
        typer.Option(
            help="a built-in recipe (training/recipes/: default, omniglot) or a recipe JSON file; "
            "the options below override its fields"
        ),
    ] = "default",
    out: Annotated[
        Path | None, typer.Option(help="bundle folder to write \\[default: models/<recipe>]")
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option(help="folder for the runs, evaluation.json and roc.png \\[default: runs/<recipe>]"),
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="override the recipe's dataset")] = None,
    heldout_classes: Annotated[
        str | None, typer.Option(help="comma-separated identities never trained on")
    ] = None,
    heldout_groups: Annotated[
        str | None,
        typer.Option(help="comma-separated groups held out whole (a dataset with <group>/<identity>/)"),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs of each of the two runs")] = None,
    center_lambda: Annotated[float | None, typer.Option("--lambda", help="center-loss weight (> 0)")] = None,
    head: Annotated[str | None, typer.Option(help="classification head of both runs")] = None,
    backbone: Annotated[str | None, typer.Option(help="backbone of both runs")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of weights, split and batch order")] = None,
    target_far: Annotated[
        float | None,
        typer.Option(
            help="FAR the default threshold is calibrated for "
            f"\\[default: the recipe's, else {DEFAULT_TARGET_FAR:g}]"
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="model name in the manifest")] = None,
    version: Annotated[str | None, typer.Option(help="model version in the manifest")] = None,
    samples: Annotated[
        int | None, typer.Option(help="test identities whose images go to <out>/samples (0 = none)")
    ] = None,
    pca_components: _Pca = DEFAULT_PCA_COMPONENTS,
    eval_seed: Annotated[
        int | None, typer.Option("--eval-seed", help=_evaluation_help("seed") + " \\[default: the recipe's]")
    ] = None,
    calibration_fraction: Annotated[
        float | None,
        typer.Option(help=_evaluation_help("calibration_fraction") + " \\[default: the recipe's]"),
    ] = None,
    retrain: Annotated[
        bool,
        typer.Option(help="train both runs again even if --work holds finished runs of the same options"),
    ] = False,
) -> None:
    """ONE seeded command: train a recipe and its lambda-0 twin, compare with PCA, calibrate, export."""
    import shutil

    from training.recipes import RecipeError, load_recipe
    from training.run import RunPaths
    from training.workflows.build_bundle import build_bundle as run_build
    from training.workflows.build_bundle import run_dirs
    from training.workflows.report import markdown_table

    reused: list[Path] = []
    try:
        chosen = load_recipe(recipe)
        train_options = {
            **chosen.train,
            **_given(
                dataset=dataset,
                heldout_classes=_split_names(heldout_classes),
                heldout_groups=_split_names(heldout_groups),
                epochs=epochs,
                center_lambda=center_lambda,
                head=head,
                backbone=backbone,
                seed=seed,
            ),
        }
        config = RunConfig.from_options(**train_options)
        known = {f.name for f in dataclasses.fields(EvaluationSettings)}
        unknown = sorted(set(chosen.evaluation) - known)
        if unknown:
            raise RecipeError(f"{chosen.path}: unknown evaluation setting(s) {', '.join(unknown)}")
        evaluation = {k: tuple(v) if isinstance(v, list) else v for k, v in chosen.evaluation.items()}
        settings = EvaluationSettings(
            **{**evaluation, **_given(seed=eval_seed, calibration_fraction=calibration_fraction)}
        )
        bundle = {
            **chosen.bundle,
            **_given(name=name, version=version, target_far=target_far, samples=samples),
        }
        stem = chosen.path.stem
        out = out or Path("models") / stem
        work = work or Path("runs") / stem
        runs = [d for d in run_dirs(work) if RunPaths(d).config.is_file()]
        reused = [d for d in runs if RunPaths(d).embedding.is_file()]
        if retrain:
            for d in runs:
                shutil.rmtree(d)
            reused = []
        elif reused:
            typer.echo(
                f"note: reusing {len(reused)} finished run(s) in {work.resolve()} instead of training (pass "
                "--retrain to train again)",
                err=True,
            )
        result = run_build(
            config,
            out,
            work_dir=work,
            settings=settings,
            target_far=float(bundle.get("target_far", DEFAULT_TARGET_FAR)),
            pca_components=pca_components,
            name=str(bundle.get("name", f"idembed-{stem}")),
            version=str(bundle.get("version", "1")),
            samples=int(bundle.get("samples", 0)),
        )
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    typer.echo(markdown_table(result.comparison))
    th = result.manifest.thresholds
    oos = th.out_of_sample
    measured = (
        f"; on {oos.num_identities} test identities: FAR {oos.at_default.far:.2g} "
        f"({oos.at_default.far_interval.low:.2g}..{oos.at_default.far_interval.high:.2g}), "
        f"TAR {oos.at_default.tar:.3f}"
        if oos is not None
        else ""
    )
    typer.echo(
        f"bundle {out} ({result.manifest.model_id}); threshold {th.default:.4f} chosen at FAR "
        f"{th.at_target_far.far:.2g} on {th.calibration_identities} calibration identities{measured}; "
        f"report {result.report_path}, ROC {result.roc_path}; wall time {result.wall_seconds:.0f} s"
        + (
            f" (reused {len(reused)} finished run(s), not retrained; --retrain trains again)"
            if reused
            else ""
        )
    )


@app.command()
def figures(
    out: Annotated[Path, typer.Option(help="PNG of the side-by-side 2-D features")] = Path(
        "docs/images/features_2d_digits.png"
    ),
    work: Annotated[Path, typer.Option(help="folder for the two 2-D runs")] = Path("runs/figures"),
    dataset: Annotated[str, typer.Option(help="'digits' or an IDX folder/prefix")] = "digits",
    heldout_classes: Annotated[str, typer.Option(help="identities left out (not plotted)")] = "7,8,9",
    epochs: Annotated[int, typer.Option(help="epochs of each run")] = 30,
    center_lambda: Annotated[float, typer.Option("--lambda", help="center-loss weight, right panel")] = 0.1,
    width: Annotated[int, typer.Option(help="filters of the first LeNet++ stage")] = 8,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
) -> None:
    """The paper's Fig. 3: 2-D LeNet++ features with centers, lambda = 0 beside lambda > 0."""
    from training.workflows.figures import feature_figure

    try:
        config = RunConfig.from_options(
            dataset=dataset,
            heldout_classes=_split_names(heldout_classes),
            backbone="lenetpp",
            feature_dim=2,
            width=width,
            center_lambda=center_lambda,
            epochs=epochs,
            seed=seed,
        )
        path = feature_figure(config, work, out)
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"wrote {path}")


def _floats(option: str, value: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise _fail(f"{option} {value!r}: expected a number or comma-separated numbers, e.g. 127.5") from None
    return out


# ImportOptions' defaults, which `import` shows and uses.
_IMPORT = {
    f.name: f.default for f in dataclasses.fields(ImportOptions) if f.default is not dataclasses.MISSING
}
# The resampling filters the bundle contract knows (bundle/manifest.py `Preprocessing.resample`).
_RESAMPLE = typing.get_args(Preprocessing.model_fields["resample"].annotation)


def _numbers(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


@app.command("import")
def import_(
    model: Annotated[
        Path, typer.Argument(help="the ONNX embedding model (one image input, [N, dim] output)")
    ],
    dataset: Annotated[
        str,
        typer.Option(help="labelled identity folder (one sub-folder per identity), or any `train --dataset`"),
    ],
    out: Annotated[Path, typer.Option(help="bundle folder to write (replaced atomically)")],
    layout: Annotated[str, typer.Option(help="NCHW ([N, C, H, W], insightface/PyTorch) | NHWC")] = _IMPORT[
        "layout"
    ],
    size: Annotated[int | None, typer.Option(help="input height and width (square)")] = None,
    height: Annotated[
        int | None, typer.Option(help=f"input height \\[default: --size, else {_IMPORT['height']}]")
    ] = None,
    width: Annotated[
        int | None, typer.Option(help=f"input width \\[default: --size, else {_IMPORT['width']}]")
    ] = None,
    channels: Annotated[int, typer.Option(help="3 (colour) | 1 (grayscale)")] = _IMPORT["channels"],
    channel_order: Annotated[str, typer.Option(help="RGB | BGR (the order the model wants)")] = _IMPORT[
        "channel_order"
    ],
    scale: Annotated[float, typer.Option(help="pixel (0..255) * scale, before (x - mean) / std")] = _IMPORT[
        "scale"
    ],
    mean: Annotated[str, typer.Option(help="per-channel mean, one value or C comma-separated")] = _numbers(
        _IMPORT["mean"]
    ),
    std: Annotated[str, typer.Option(help="per-channel std, one value or C comma-separated")] = _numbers(
        _IMPORT["std"]
    ),
    resample: Annotated[str, typer.Option(help=" | ".join(_RESAMPLE))] = _IMPORT["resample"],
    output_name: Annotated[
        str | None, typer.Option(help="graph output that is the embedding [default: the only output]")
    ] = None,
    heldout_classes: Annotated[
        str | None, typer.Option(help="comma-separated identities kept out of the centers for calibration")
    ] = None,
    heldout_fraction: Annotated[
        float, typer.Option(help="fraction of identities held out (evaluation, thresholds) when not named")
    ] = _IMPORT["heldout_fraction"],
    heldout_groups: _HeldoutGroups = None,
    heldout_group_count: _HeldoutGroupCount = None,
    seed: Annotated[int, typer.Option(help="seed of the held-out draw and the pair sample")] = _IMPORT[
        "seed"
    ],
    target_far: _TargetFar = _IMPORT["target_far"],
    pca_components: Annotated[
        int, typer.Option(help="components of a PCA-on-pixels baseline in the manifest (0 = skip)")
    ] = 0,
    name: Annotated[str, typer.Option(help="model name in the manifest")] = _IMPORT["name"],
    version: Annotated[str, typer.Option(help="model version in the manifest")] = _IMPORT["version"],
    quantize: _Quantize = None,
    quantize_method: _QuantizeMethod = _IMPORT["quantize_method"],
    embed_preprocessing: Annotated[
        bool,
        typer.Option(
            help="serve a graph that takes uint8 NHWC pixels (decoded, resized) and does the layout, channel "
            "order and scale/mean/std itself (manifest input.dtype uint8)"
        ),
    ] = _IMPORT["embed_preprocessing"],
    rewrite_graph: Annotated[
        bool,
        typer.Option(
            "--rewrite-graph/--keep-graph",
            help="rewrite each PReLU exactly as depthwise Conv + Relu (faster in onnxruntime, and needed for "
            "a correct int8 model), checked against the source graph on the folder's images; --keep-graph "
            "serves the source graph node for node",
        ),
    ] = _IMPORT["rewrite_graph"],
) -> None:
    """Wrap an existing ONNX embedding model as a bundle: centers and calibrated thresholds from a folder."""
    from training.import_onnx import import_model

    for option, value in (("--size", size), ("--height", height), ("--width", width)):
        if value is not None and not 0 < value <= 4096:
            raise _fail(f"{option} must be in 1..4096, got {value}")
    if resample not in _RESAMPLE:
        raise _fail(f"--resample must be {', '.join(_RESAMPLE)}, got {resample!r}")
    if quantize_method not in QUANTIZE_METHODS:
        raise _fail(f"--quantize-method must be {' or '.join(QUANTIZE_METHODS)}, got {quantize_method!r}")
    opts = ImportOptions(
        model=model,
        dataset=dataset,
        layout=layout,
        height=height or size or _IMPORT["height"],
        width=width or size or _IMPORT["width"],
        channels=channels,
        channel_order=channel_order,
        scale=scale,
        mean=_floats("--mean", mean),
        std=_floats("--std", std),
        resample=resample,
        output_name=output_name,
        heldout_fraction=heldout_fraction,
        heldout_classes=None if heldout_classes is None else tuple(_split_names(heldout_classes) or ()),
        heldout_groups=None if heldout_groups is None else tuple(_split_names(heldout_groups) or ()),
        heldout_group_count=heldout_group_count,
        seed=seed,
        target_far=target_far,
        pca_components=pca_components or None,
        name=name,
        version=version,
        quantize=quantize,
        quantize_method=quantize_method,
        embed_preprocessing=embed_preprocessing,
        rewrite_graph=rewrite_graph,
    )
    started = time.perf_counter()
    try:
        result = import_model(out, opts)
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    m, th = result.manifest, result.manifest.thresholds
    q = m.quantization
    typer.echo(
        f"bundle {out}: {m.model_id} from {model.name} (sha256 {m.provenance.source_sha256[:12]}...), "
        f"{m.input.layout} {m.input.height}x{m.input.width}x{m.input.channels}, dim {m.embedding.dim}, "
        f"{m.num_classes} centers; held-out EER {m.evaluation['eer']:.4f}; threshold {th.default:.4f} "
        f"(FAR {th.at_target_far.far:.2g}, TAR {th.at_target_far.tar:.3f})"
        + ("" if q is None else f"; int8 EER {q.int8_eer:.4f} vs fp32 {q.fp32_eer:.4f}, {_int8_speed(q)}")
        + f"; {time.perf_counter() - started:.1f} s"
    )


@app.command("check-bundle")
def check_bundle(
    bundle: Annotated[Path, typer.Argument(help="bundle folder")] = Path("models/default"),
    tolerance: Annotated[float, typer.Option(help="allowed |manifest - measured| per number")] = 1e-3,
) -> None:
    """Re-measure a bundle's manifest numbers with its own ONNX model on its recipe's held-out identities."""
    from training.workflows.check_bundle import check_bundle as run_check

    try:
        result = run_check(bundle, tolerance=tolerance)
    except _user_errors() as exc:
        raise _fail(str(exc)) from exc
    typer.echo("| number | manifest | measured |\n|---|---|---|")
    for key, recorded, measured in result.rows:
        typer.echo(f"| {key} | {recorded:.4f} | {measured:.4f} |")
    if not result.ok:
        raise _fail(f"{bundle}: manifest numbers differ from its model by more than {tolerance:g}")
    typer.echo(f"{bundle}: every number reproduced within {tolerance:g}")


if __name__ == "__main__":  # `python -m training.cli ...` runs this checkout (the console script may not)
    app()
