"""`idembed-train`: the command-line face of training/ (a thin Typer layer over functions in the package)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from training.config import ConfigError, RunConfig
from training.data import DataError
from training.run import RunError, RunPaths

app = typer.Typer(
    help="Train identity embeddings with softmax (or a margin head) + center loss, evaluate and export them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main() -> None:
    """Keeps `train` (and the commands added beside it) as explicit sub-commands."""


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def _split_names(value: str | None) -> list[str] | None:
    return None if value is None else [s.strip() for s in value.split(",")]


@app.command()
def train(
    dataset: Annotated[
        str,
        typer.Option(
            help="'digits' (bundled), an IDX folder or prefix (MNIST format, .gz or raw), "
            "or an image folder with one sub-folder per identity"
        ),
    ] = "digits",
    out: Annotated[
        Path | None,
        typer.Option(help="run folder [default: runs/<dataset>-<backbone>-<rule>-lambda<L>-s<seed>]"),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="continue the run in --out from its last checkpoint (its saved options are used; "
            "only --epochs may change, to extend it)"
        ),
    ] = False,
    epochs: Annotated[int | None, typer.Option(help="epochs to train in total [default: 20]")] = None,
    batch_size: Annotated[int, typer.Option(help="global batch size (split across replicas)")] = 64,
    lr: Annotated[float, typer.Option(help="learning rate of the feature/head optimizer")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adam | sgd (momentum 0.9)")] = "adam",
    seed: Annotated[int, typer.Option(help="seed of weights, splits and batch order")] = 0,
    center_lambda: Annotated[
        float, typer.Option("--lambda", help="center-loss weight; 0 = softmax only (centers still tracked)")
    ] = 0.01,
    alpha: Annotated[
        float,
        typer.Option(
            help="center update rate in (0, 1]; for --rule facenet it is facenet's alfa "
            "(centers move by 1 - alfa)"
        ),
    ] = 0.5,
    rule: Annotated[
        str,
        typer.Option(
            help="center update: paper (Eq. 4) | facenet (scatter_sub) | gradient (SGD, --center-lr) "
            "| none (centers stay 0; needs --lambda 0)"
        ),
    ] = "paper",
    center_lr: Annotated[float, typer.Option(help="learning rate of the centers with --rule gradient")] = 0.5,
    backbone: Annotated[
        str, typer.Option(help="lenetpp (paper's toy CNN) | facecnn (face crops)")
    ] = "lenetpp",
    feature_dim: Annotated[int, typer.Option(help="embedding size (2 to plot features)")] = 32,
    width: Annotated[int, typer.Option(help="filters of the first conv stage (doubles per stage)")] = 32,
    head: Annotated[
        str, typer.Option(help="classification head (training only): softmax or a margin head")
    ] = ("softmax"),
    margin: Annotated[
        float | None, typer.Option(help="margin of a margin head [default: the head's]")
    ] = None,
    scale: Annotated[float | None, typer.Option(help="scale of a margin head [default: the head's]")] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="square input size [default: the dataset's (8 digits, 28 IDX), else 28 lenetpp, 96 facecnn]"
        ),
    ] = None,
    color_mode: Annotated[str, typer.Option(help="L (grayscale) | RGB")] = "L",
    heldout_classes: Annotated[
        str | None, typer.Option(help="comma-separated identities never trained on, e.g. 7,8,9")
    ] = None,
    heldout_count: Annotated[
        int | None, typer.Option(help="hold out this many identities, chosen by seed")
    ] = (None),
    heldout_fraction: Annotated[
        float, typer.Option(help="fraction of identities held out when no names/count are given")
    ] = 0.3,
    val_fraction: Annotated[
        float, typer.Option(help="fraction of each training identity's images used for validation")
    ] = 0.15,
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
    from training.distributed import DistributedConfigError, make_strategy, resolve_tf_config
    from training.heads import check_head_options
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
            head_params = {k: v for k, v in (("margin", margin), ("scale", scale)) if v is not None}
            config = RunConfig.from_options(
                dataset=dataset,
                image_size=image_size,
                color_mode=color_mode,
                heldout_classes=_split_names(heldout_classes),
                heldout_count=heldout_count,
                heldout_fraction=heldout_fraction,
                val_fraction=val_fraction,
                backbone=backbone,
                feature_dim=feature_dim,
                width=width,
                head=head,
                head_params=head_params,
                center_lambda=center_lambda,
                alpha=alpha,
                rule=rule,
                center_lr=center_lr,
                epochs=20 if epochs is None else epochs,
                batch_size=batch_size,
                lr=lr,
                optimizer=optimizer,
                seed=seed,
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
    if cluster is not None and not cluster.is_chief:
        typer.echo(f"worker {cluster.task.type}:{cluster.task.index} done; the chief writes {run_dir}")
        return
    summary = json.loads(RunPaths(run_dir).summary.read_text())
    typer.echo(f"run folder: {run_dir}")
    typer.echo("final: " + ", ".join(f"{k}={v:.4f}" for k, v in summary["final"].items()))
