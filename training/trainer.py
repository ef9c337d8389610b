"""train(config) -> run folder: builds data, model and callbacks from a RunConfig and runs keras fit().

This is the function the CLI calls and other code (baselines, evaluation scripts) can call directly.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from training.backbones import build_backbone
from training.center_rules import check_update_rule, step_factor
from training.config import ConfigError, RunConfig
from training.data import Splits, build_splits, eval_dataset, steps_per_epoch, train_dataset
from training.data.augment import augmentation_from_config
from training.data.streaming import naming_undecodable_images
from training.distributed import is_chief
from training.heads import make_head
from training.model import CenterLossModel, PixelNormalization
from training.partial_fc import build_partial_fc
from training.precision import float32_copy, wrap_optimizer
from training.run import (
    RunError,
    RunPaths,
    latest_checkpoint,
    prepare_run_dir,
    prune_checkpoints,
    save_final,
    truncate_history,
)
from training.sharded_fc import (
    HeadStateCheckpoint,
    ShardedPartialFCModel,
    build_sharded_partial_fc,
    head_state_folder,
)

CHECKPOINTS_KEPT = 3
EVAL_BATCH_SIZE = 256


def build_model(config: RunConfig, splits: Splits) -> CenterLossModel:
    """The compiled training model of `config` (call inside a strategy scope to distribute it)."""
    shape = (splits.input_spec.height, splits.input_spec.width, splits.input_spec.channels)
    try:
        backbone = build_backbone(
            config.backbone, shape, config.feature_dim, config.width, precision=config.precision
        )
    except ValueError as exc:  # an input size the backbone cannot take (e.g. digits' 8x8 for IResNet)
        raise ConfigError(str(exc)) from exc
    try:
        head = make_head(config.head, len(splits.class_names), **config.head_params)
    except ValueError as exc:
        # Some limits depend on the number of classes (CosFace's K/(K-1)), known only once data is read.
        raise ConfigError(f"--head {config.head}: {exc}") from exc
    center_options = dict(
        center_lambda=config.center_lambda, alpha=config.alpha, rule=config.rule, center_lr=config.center_lr
    )
    # Streamed batches arrive as uint8 pixels and are normalised in the model graph (training/model.py).
    center_options["pixel_input"] = PixelNormalization(splits.preprocessing, splits.input_spec)
    if config.sample_rate is not None:  # issue 13: Partial FC head (training/partial_fc.py)
        # --shard-classes: weights, slots and centers split over the strategy's replicas (sharded_fc.py)
        build = build_sharded_partial_fc if config.shard_classes else build_partial_fc
        try:
            model = build(
                backbone,
                len(splits.class_names),
                head=config.head,
                head_params=config.head_params,
                sample_rate=config.sample_rate,
                seed=config.seed,
                optimizer=config.optimizer,
                **center_options,
            )
        except ValueError as exc:  # fewer classes than replicas to shard them over
            raise ConfigError(str(exc)) from exc
    else:
        model = CenterLossModel(backbone, head, len(splits.class_names), **center_options)
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(config.lr)
    else:
        optimizer = keras.optimizers.SGD(config.lr, momentum=0.9)
    optimizer = wrap_optimizer(optimizer, config.precision)  # issue 13: loss scaling for mixed_float16
    model.compile(optimizer=optimizer)
    # Create the optimizer's slots now so a checkpoint (which holds them) can be loaded before training.
    optimizer.build(model.trainable_variables)
    return model


class _PruneCheckpoints(keras.callbacks.Callback):
    """Keeps the newest few checkpoints; runs after ModelCheckpoint (callbacks fire in list order)."""

    def __init__(self, paths: RunPaths, keep: int) -> None:
        super().__init__()
        self.paths, self.keep = paths, keep

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        prune_checkpoints(self.paths, self.keep)


class DivergenceError(RunError):
    """Training stopped because its losses or centers exploded; the message names the likely cause."""


# A center is a running mean of its class's features, so its norm stays near theirs under a converging rule.
CENTER_NORM_LIMIT = 10.0


class CenterDivergenceGuard(keras.callbacks.Callback):
    """Stops fit() with a `DivergenceError`, naming the likely cause, when training has failed:

    - the losses stop being finite;
    - the centers run away: mean center norm above `CENTER_NORM_LIMIT` times the largest mean feature norm
      seen so far (a center is a running mean of features, so a converging rule keeps it near them; a
      diverging facenet rule reaches centers of 1e19 while the loss is still finite);
    - the network never leaves chance: after `STALL_EPOCHS` epochs the training accuracy is still below
      1.5 / K. Measured on Omniglot with LeNet++ (no BatchNorm, Adam 1e-3): the features shrink to ~0 (mean
      norm 0.34 -> 0.008 in one epoch), every logit equals its bias and the loss stays at ln K.

    TerminateOnNaN alone only stops on a non-finite loss and then lets the run be saved as if finished.
    """

    def __init__(self, cause: str, num_classes: int) -> None:
        super().__init__()
        self.cause = cause
        self.num_classes = num_classes
        self.chance_loss = math.log(num_classes)
        self.epoch = 0
        self.max_feature_norm = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        values = {
            k: float(logs[k]) for k in ("loss", "center_loss", "center_norm", "feature_norm") if k in logs
        }
        where = f"epoch {self.epoch + 1}, step {batch + 1}"
        bad = [k for k, v in values.items() if not np.isfinite(v)]
        if bad:
            raise DivergenceError(f"training diverged at {where}: {', '.join(bad)} not finite; {self.cause}")
        centers, features = values.get("center_norm", 0.0), values.get("feature_norm", 0.0)
        self.max_feature_norm = max(self.max_feature_norm, features)
        if centers > CENTER_NORM_LIMIT * max(self.max_feature_norm, 1e-6):
            raise DivergenceError(
                f"training diverged at {where}: mean center norm {centers:.3g} is over "
                f"{CENTER_NORM_LIMIT:g}x the largest mean feature norm {self.max_feature_norm:.3g}; "
                f"{self.cause}"
            )

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        accuracy = float(logs.get("accuracy", 1.0))  # plain (un-penalised) logits, for every head
        if epoch + 1 >= STALL_EPOCHS and accuracy < STALL_ACCURACY_FACTOR / self.num_classes:
            loss = float(logs.get("softmax_loss", float("nan")))
            norm = float(logs.get("feature_norm", float("nan")))
            raise DivergenceError(
                f"training is not learning: after {epoch + 1} epochs the training accuracy is {accuracy:.4f} "
                f"(chance 1/K = {1 / self.num_classes:.4f}; softmax loss {loss:.3f}, ln K = "
                f"{self.chance_loss:.3f}); mean feature norm {norm:.3g} (largest seen "
                f"{self.max_feature_norm:.3g}). Features that shrink to ~0 make every logit equal: use a "
                "backbone with BatchNorm (--backbone conv4 or facecnn) or a lower --lr"
            )


# A run whose training accuracy (plain logits) is still below STALL_ACCURACY_FACTOR / K after STALL_EPOCHS
# epochs is stopped. Accuracy, not the loss: a margin head's loss sits above ln K while it learns.
STALL_EPOCHS = 3
STALL_ACCURACY_FACTOR = 1.5


class MarginWarmup(keras.callbacks.Callback):
    """Phases a margin head's margin in: r = min(1, (epoch + step / steps) / warmup_epochs) before each step.

    A function of the position in training only, so a resumed run sets the same r as an uninterrupted one.
    From scratch with ~100+ classes, ArcFace's full margin can keep every target logit below the others, so
    softmax never starts to separate the classes (training accuracy stays at 0); a warm-up lets the classes
    separate first (measured in docs/heads.md).
    """

    def __init__(self, head: keras.layers.Layer) -> None:
        super().__init__()
        self.head = head
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        steps = max(1, int(self.params.get("steps") or 1))
        progress = (self.epoch + batch / steps) / self.head.warmup_epochs
        self.head.margin_ramp.assign(min(1.0, progress))


def _divergence_cause(config: RunConfig, frequencies: list[float]) -> str:
    expected = config.batch_size * max(frequencies)
    f = step_factor(
        config.rule, expected, alpha=config.alpha, center_lr=config.center_lr, batch_size=config.batch_size
    )
    return (
        f"--rule {config.rule} (--alpha {config.alpha:g}, --center-lr {config.center_lr:g}) moves a center "
        f"{f:.2f} times its distance to its batch mean at the expected count {expected:.1f} (>= 2 diverges); "
        f"also check --lr {config.lr:g}"
    )


_GATHERED_CENTERS = "centers.gathered.npy"


def _final_centers(model: CenterLossModel, paths: RunPaths, chief: bool) -> np.ndarray:
    """The trained centers `[K, D]`; a sharded model's are gathered from every worker (all must call this)
    into a memory-mapped file on the chief, so no worker holds more than its shard and one block of the
    others; the other workers keep none (their run folder is a scratch folder, deleted at the end)."""
    if not isinstance(model, ShardedPartialFCModel):
        return model.centers.numpy()
    if not chief:
        model.gather_centers(None)
        return np.zeros((0, model.feature_dim), np.float32)
    return model.gather_centers(paths.root / _GATHERED_CENTERS)


def default_run_dir(config: RunConfig) -> Path:
    dataset = config.dataset if config.dataset in ("digits", "digit-pairs") else Path(config.dataset).name
    return (
        Path("runs")
        / f"{dataset}-{config.backbone}-{config.rule}-lambda{config.center_lambda:g}-s{config.seed}"
    )


def train(
    config: RunConfig,
    out: Path | str | None = None,
    *,
    resume: bool = False,
    strategy: tf.distribute.Strategy | None = None,
    verbose: int | str = "auto",
    splits: Splits | None = None,
) -> Path:
    """Train `config` into run folder `out` (default `runs/<dataset>-<backbone>-<rule>-lambda..-s<seed>`).

    `resume=True` continues from the newest checkpoint in `out`; because weights, centers, optimizer state and
    the per-epoch data order are all restored, the result equals an uninterrupted run. `splits` may be passed
    to reuse already preprocessed data (it must come from `build_splits(config)`).
    Returns the run folder, which `training.run.load_run` reads back.
    """
    out = Path(out) if out is not None else default_run_dir(config)
    strategy = strategy or tf.distribute.get_strategy()
    # Multi-worker: every worker runs the same callbacks (saving reads metric variables synchronised across
    # workers, a collective op all of them must join), but only the chief writes the run folder; the others
    # write to a scratch folder deleted at the end. All resume from the run folder's checkpoint.
    scratch = None if is_chief(strategy) else Path(tempfile.mkdtemp(prefix="idembed-worker-"))
    if splits is None:
        # Before the run folder exists: a held-out name the dataset lacks must not leave a folder behind.
        splits = build_splits(config)
    # Class shares over ALL training images: a streamed split's `y_train` is only its small in-memory sample.
    stream = getattr(splits, "train_stream", None)
    train_labels = stream.train_labels if stream is not None else splits.y_train
    frequencies = (np.bincount(train_labels, minlength=len(splits.class_names)) / len(train_labels)).tolist()
    try:
        warning = check_update_rule(
            config.rule,
            frequencies,
            alpha=config.alpha,
            center_lr=config.center_lr,
            batch_size=config.batch_size,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if warning:
        print(f"warning: {warning}")
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        # Before the run folder too: a head option that depends on the class count (CosFace's m limit) is
        # refused here, and must not leave a config.json that makes the corrected retry fail "folder exists".
        model = build_model(config, splits)
    if isinstance(model, ShardedPartialFCModel):
        print(model.describe())
    # Before the run folder as well: an unreadable --verify-pairs file must not leave a folder behind.
    from training.verification_bin import load_pair_sets, verification_callbacks, verification_summary

    pair_sets = load_pair_sets(config)
    paths = prepare_run_dir(scratch or out, config, resume=resume and scratch is None)

    initial_epoch = 0
    found = latest_checkpoint(RunPaths(out)) if resume else None
    if found is not None:
        initial_epoch, checkpoint = found
        model.load_weights(checkpoint)
        if isinstance(model, ShardedPartialFCModel):  # issue 13: the head's shards live next to it
            try:
                model.load_head_state(head_state_folder(checkpoint))
            except (FileNotFoundError, ValueError) as exc:
                raise RunError(f"--resume: {exc}") from exc
    truncate_history(paths, initial_epoch)
    if initial_epoch >= config.epochs:
        print(f"{paths.root}: already trained for {initial_epoch} epochs (--epochs {config.epochs})")

    callbacks = [
        # issue 13: Partial FC's softmax is over the sampled classes: chance is 1 / num_sample, not 1 / K.
        CenterDivergenceGuard(
            _divergence_cause(config, frequencies),
            getattr(model.head, "num_sample", len(splits.class_names)),
        ),
        *([MarginWarmup(model.head)] if getattr(model.head, "warmup_epochs", 0) > 0 else []),
        keras.callbacks.ModelCheckpoint(
            str(paths.checkpoints / "epoch-{epoch:03d}.weights.h5"), save_weights_only=True
        ),
        _PruneCheckpoints(paths, CHECKPOINTS_KEPT),
        # issue 13: every worker gathers the head's shards; each writes them into its own folder
        *(
            [HeadStateCheckpoint(model, paths.checkpoints, CHECKPOINTS_KEPT, write=scratch is None)]
            if isinstance(model, ShardedPartialFCModel)
            else []
        ),
        keras.callbacks.CSVLogger(str(paths.history), append=initial_epoch > 0),
    ]
    if importlib.util.find_spec("tensorboard") is not None:
        callbacks.append(keras.callbacks.TensorBoard(str(paths.logs), write_graph=False, profile_batch=0))
    else:
        # tf.summary needs the tensorboard package; training is still valid without its event files.
        print("warning: tensorboard is not installed; no TensorBoard logs (pip install tensorboard)")
    validation = (
        eval_dataset(splits.x_val, splits.y_val, batch_size=EVAL_BATCH_SIZE) if len(splits.x_val) else None
    )
    # --- streaming input and pair verification (training/data/streaming.py, training/verification_bin.py)
    num_train = stream.num_examples if stream is not None else len(splits.x_train)
    make_input = (
        stream.dataset if stream is not None else partial(train_dataset, splits.x_train, splits.y_train)
    )
    callbacks += verification_callbacks(config, paths, model.backbone, splits, pair_sets)
    # --- end streaming input and pair verification
    started = time.monotonic()
    history: dict[str, list[float]] = {}
    if initial_epoch < config.epochs:
        fit = naming_undecodable_images(
            model.fit, stream, model, seed=config.seed, batch_size=config.batch_size
        )(
            make_input(
                batch_size=config.batch_size,
                seed=config.seed,
                epochs=config.epochs,
                initial_epoch=initial_epoch,
                augment=augmentation_from_config(config, splits.preprocessing),
            ),
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch(num_train, config.batch_size),
            validation_data=validation,
            callbacks=callbacks,
            shuffle=False,
            verbose=verbose,
        )
        history = fit.history
    centers = _final_centers(model, paths, chief=scratch is None)
    if initial_epoch < config.epochs and not np.all(np.isfinite(centers)):
        raise FloatingPointError(f"{paths.root}: training diverged (non-finite centers); lower --lr/--alpha")
    summary = {
        "epochs": config.epochs,
        "resumed_from_epoch": initial_epoch,
        "seconds": round(time.monotonic() - started, 2),
        "final": {k: float(v[-1]) for k, v in history.items()},
        "num_train": num_train,
        "num_val": len(splits.x_val),
        "num_heldout": len(splits.x_heldout),
        "versions": {
            "python": sys.version.split()[0],
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    }
    summary.update(verification_summary(callbacks, stream))
    if isinstance(model, ShardedPartialFCModel):  # issue 13: what the chief stored of the head
        summary["head_shards"] = {
            "shards": model.shards.num_shards,
            "rows_per_shard": model.shards.rows,
            "head_state_bytes": model.shard_bytes(),
        }
    # issue 13: the saved/exported embedding model is float32 whatever the training precision.
    save_final(paths, float32_copy(model.backbone), centers, splits, summary)
    gathered = paths.root / _GATHERED_CENTERS
    if gathered.exists():
        del centers
        gathered.unlink()
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    return out
