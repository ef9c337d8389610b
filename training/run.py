"""The run folder: where a training run keeps its config, checkpoints, history and final model, and how a
finished run is loaded back (config, embedding model, centers, class names, its exact splits).

Layout of `<run>/`:
    config.json                 RunConfig (the whole recipe; enough to rebuild the splits)
    classes.json                {"train": [...K names, row k of the centers...], "heldout": [...]}
    checkpoints/epoch-NNN.weights.h5   model + centers + optimizer state after epoch NNN (last few kept)
    history.csv                 per-epoch metrics (CSVLogger)
    logs/                       TensorBoard event files
    embedding.keras             final image -> features model (built-in layers only)
    centers.npy                 final centers, float32 [K, D] (raw feature space, not normalised)
    summary.json                final metrics, epochs, duration, tool versions
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from bundle.manifest import InputSpec, Preprocessing
from training.config import ConfigError, RunConfig
from training.data import Splits, build_splits, model_input

CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.json"
CHECKPOINT_DIR = "checkpoints"
HISTORY_FILE = "history.csv"
LOGS_DIR = "logs"
EMBEDDING_FILE = "embedding.keras"
CENTERS_FILE = "centers.npy"
SUMMARY_FILE = "summary.json"
CHECKPOINT_PATTERN = "epoch-{epoch:03d}.weights.h5"
_CHECKPOINT_RE = re.compile(r"^epoch-(\d+)\.weights\.h5$")


class RunError(ValueError):
    """A run folder that cannot be used as asked (missing files, config mismatch on resume, ...)."""


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def classes(self) -> Path:
        return self.root / CLASSES_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def history(self) -> Path:
        return self.root / HISTORY_FILE

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def embedding(self) -> Path:
        return self.root / EMBEDDING_FILE

    @property
    def centers(self) -> Path:
        return self.root / CENTERS_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / CHECKPOINT_PATTERN.format(epoch=epoch)


def prepare_run_dir(out: Path | str, config: RunConfig, *, resume: bool) -> RunPaths:
    """Create a new run folder (refusing to overwrite a non-empty one) or check one to resume.

    On resume the saved config must equal `config` except for `epochs` (extending a run is allowed; anything
    else would silently mix two recipes in one folder).
    """
    paths = RunPaths(Path(out))
    if resume:
        saved = RunConfig.load(paths.config)
        if saved.model_copy(update={"epochs": config.epochs}) != config:
            changed = [
                k for k in RunConfig.model_fields if getattr(saved, k) != getattr(config, k) and k != "epochs"
            ]
            raise RunError(f"{paths.config}: --resume with different options ({', '.join(changed)})")
    elif paths.root.exists() and any(paths.root.iterdir()):
        raise RunError(
            f"--out {paths.root}: folder exists and is not empty; pass --resume or pick a new folder"
        )
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(config.model_dump_json(indent=2) + "\n")
    return paths


def latest_checkpoint(paths: RunPaths) -> tuple[int, Path] | None:
    """(epoch, file) of the newest checkpoint, or None when the run has none yet."""
    found = []
    if paths.checkpoints.is_dir():
        for f in paths.checkpoints.iterdir():
            m = _CHECKPOINT_RE.match(f.name)
            if m:
                found.append((int(m.group(1)), f))
    return max(found) if found else None


def prune_checkpoints(paths: RunPaths, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints (each holds the optimizer state too, so they add up)."""
    found = []
    for f in paths.checkpoints.glob("epoch-*.weights.h5"):
        m = _CHECKPOINT_RE.match(f.name)
        if m:
            found.append((int(m.group(1)), f))
    for _, f in sorted(found)[:-keep]:
        f.unlink(missing_ok=True)


def truncate_history(paths: RunPaths, epochs_done: int) -> None:
    """Drop history rows past the last checkpoint, so a resumed run appends without duplicate epochs."""
    if not paths.history.is_file():
        return
    with paths.history.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [r for r in body if r and int(r[0]) < epochs_done]
    with paths.history.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *kept])


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def save_final(
    paths: RunPaths, embedding: keras.Model, centers: np.ndarray, splits: Splits, summary: dict[str, Any]
) -> None:
    """Write the finished run's embedding model, centers, class names and summary."""
    embedding.save(paths.embedding)
    np.save(paths.centers, np.asarray(centers, dtype=np.float32), allow_pickle=False)
    write_json(paths.classes, {"train": splits.class_names, "heldout": splits.heldout_class_names})
    write_json(paths.summary, summary)


@dataclass(frozen=True)
class TrainedRun:
    """A finished run loaded back: everything evaluation and export need (see docs/training.md)."""

    path: Path
    config: RunConfig
    embedding: keras.Model  # preprocessed image batch [N, H, W, C] -> raw features [N, D]
    centers: np.ndarray  # float32 [K, D], row k = class_names[k], raw (unnormalised) feature space
    class_names: list[str]
    heldout_class_names: list[str]
    input_spec: InputSpec
    preprocessing: Preprocessing

    def splits(self) -> Splits:
        """Rebuild the run's exact train/val/held-out arrays (preprocessed) from its config."""
        splits = build_splits(self.config)
        if splits.class_names != self.class_names:
            raise RunError(
                f"{self.path / CLASSES_FILE}: the dataset now gives classes {splits.class_names}, "
                f"the run was trained on {self.class_names} (dataset changed since training?)"
            )
        return splits


def load_run(path: Path | str) -> TrainedRun:
    """Load a finished run folder; errors name the missing/bad file."""
    paths = RunPaths(Path(path))
    try:
        config = RunConfig.load(paths.config)
    except ConfigError as exc:
        raise RunError(str(exc)) from exc
    for required in (paths.embedding, paths.centers, paths.classes):
        if not required.is_file():
            raise RunError(
                f"{required}: missing (did training finish? `idembed-train train --resume` ends it)"
            )
    embedding = keras.saving.load_model(paths.embedding, compile=False)
    centers = np.load(paths.centers, allow_pickle=False).astype(np.float32)
    classes = json.loads(paths.classes.read_text(encoding="utf-8"))
    if centers.shape != (len(classes["train"]), embedding.output.shape[-1]):
        raise RunError(
            f"{paths.centers}: shape {centers.shape}, expected ({len(classes['train'])}, "
            f"{embedding.output.shape[-1]}) from {CLASSES_FILE} and {EMBEDDING_FILE}"
        )
    spec, prep = model_input(config)
    return TrainedRun(
        path=paths.root,
        config=config,
        embedding=embedding,
        centers=centers,
        class_names=list(classes["train"]),
        heldout_class_names=list(classes["heldout"]),
        input_spec=spec,
        preprocessing=prep,
    )
