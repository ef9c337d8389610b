"""Finished runs as the workflows use them: a run of exactly a config (reused when finished, resumed when
interrupted, trained when absent), its softmax-only twin, and its features."""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np

from training.config import RunConfig
from training.data import Splits
from training.run import RunError, RunPaths
from training.trainer import train

EMBED_BATCH = 512


def embed(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Raw features of preprocessed images `[N, H, W, C]` (float32 `[N, D]`)."""
    return np.asarray(model.predict(images, batch_size=EMBED_BATCH, verbose=0), dtype=np.float32)


def softmax_twin(config: RunConfig) -> RunConfig:
    """The softmax-only baseline of a run: every option equal except the center-loss weight (0)."""
    return config.model_copy(update={"center_lambda": 0.0})


def twin_dir(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + "-softmax")


def ensure_run(config: RunConfig, out: Path, *, verbose: int | str = 2, splits: Splits | None = None) -> Path:
    """A finished run of exactly `config` in `out`: reused when finished, resumed when interrupted, trained
    when absent.

    Reuse makes `build-bundle` restartable and lets `evaluate` share one softmax twin between calls. A folder
    holding a run of different options is never reused or overwritten: that is an error naming the options.
    """
    paths = RunPaths(out)
    if not paths.config.is_file():
        return train(config, out, verbose=verbose, splits=splits)
    saved = RunConfig.load(paths.config)
    if saved != config:
        changed = [k for k in RunConfig.model_fields if getattr(saved, k) != getattr(config, k)]
        raise RunError(
            f"{out}: holds a run with other options ({', '.join(changed)}); use another --work/--out "
            "folder or delete this one"
        )
    if paths.embedding.is_file():
        if verbose:
            print(
                f"reusing the finished run in {out.resolve()} (same options, not retrained)", file=sys.stderr
            )
        return out
    return train(config, out, resume=True, verbose=verbose, splits=splits)
