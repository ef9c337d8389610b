"""train(config) -> run folder: builds data, model and callbacks from a RunConfig and runs keras fit().

This is the function the CLI calls and other code (baselines, evaluation scripts) can call directly.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from training.backbones import build_backbone
from training.center_rules import check_update_rule, step_factor
from training.config import ConfigError, RunConfig
from training.data import Splits, build_splits, eval_dataset, steps_per_epoch, train_dataset
from training.distributed import is_chief
from training.heads import make_head
from training.model import CenterLossModel
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
    if config.sample_rate is not None:  # issue 13: Partial FC head (training/partial_fc.py)
        model = build_partial_fc(
            backbone,
            len(splits.class_names),
            head=config.head,
            head_params=config.head_params,
            sample_rate=config.sample_rate,
            seed=config.seed,
            optimizer=config.optimizer,
            **center_options,
        )
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
    """Stops fit() with a `DivergenceError` once the losses stop being finite or the mean center norm exceeds
    `CENTER_NORM_LIMIT` times the mean feature norm (centers running away from the features they track).

    TerminateOnNaN alone only stops on a non-finite loss and then lets the run be saved as if finished; a
    diverging facenet rule reaches centers of 1e19 with a finite loss first.
    """

    def __init__(self, cause: str) -> None:
        super().__init__()
        self.cause = cause
        self.epoch = 0

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
        if centers > CENTER_NORM_LIMIT * max(features, 1e-6):
            raise DivergenceError(
                f"training diverged at {where}: mean center norm {centers:.3g} is over "
                f"{CENTER_NORM_LIMIT:g}x the mean feature norm {features:.3g}; {self.cause}"
            )


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


def default_run_dir(config: RunConfig) -> Path:
    dataset = "digits" if config.dataset == "digits" else Path(config.dataset).name
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
    frequencies = (
        np.bincount(splits.y_train, minlength=len(splits.class_names)) / len(splits.y_train)
    ).tolist()
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
    paths = prepare_run_dir(scratch or out, config, resume=resume and scratch is None)

    initial_epoch = 0
    found = latest_checkpoint(RunPaths(out)) if resume else None
    if found is not None:
        initial_epoch, checkpoint = found
        model.load_weights(checkpoint)
    truncate_history(paths, initial_epoch)
    if initial_epoch >= config.epochs:
        print(f"{paths.root}: already trained for {initial_epoch} epochs (--epochs {config.epochs})")

    callbacks = [
        CenterDivergenceGuard(_divergence_cause(config, frequencies)),
        keras.callbacks.ModelCheckpoint(
            str(paths.checkpoints / "epoch-{epoch:03d}.weights.h5"), save_weights_only=True
        ),
        _PruneCheckpoints(paths, CHECKPOINTS_KEPT),
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
    started = time.monotonic()
    history: dict[str, list[float]] = {}
    if initial_epoch < config.epochs:
        fit = model.fit(
            train_dataset(
                splits.x_train,
                splits.y_train,
                batch_size=config.batch_size,
                seed=config.seed,
                epochs=config.epochs,
                initial_epoch=initial_epoch,
            ),
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch(len(splits.x_train), config.batch_size),
            validation_data=validation,
            callbacks=callbacks,
            shuffle=False,
            verbose=verbose,
        )
        history = fit.history
        if not np.all(np.isfinite(model.centers.numpy())):
            raise FloatingPointError(
                f"{paths.root}: training diverged (non-finite centers); lower --lr/--alpha"
            )
    summary = {
        "epochs": config.epochs,
        "resumed_from_epoch": initial_epoch,
        "seconds": round(time.monotonic() - started, 2),
        "final": {k: float(v[-1]) for k, v in history.items()},
        "num_train": len(splits.x_train),
        "num_val": len(splits.x_val),
        "num_heldout": len(splits.x_heldout),
        "versions": {
            "python": sys.version.split()[0],
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    }
    # issue 13: the saved/exported embedding model is float32 whatever the training precision.
    save_final(paths, float32_copy(model.backbone), model.centers.numpy(), splits, summary)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    return out
