"""`build-bundle`, the one command: train softmax + center and its softmax twin, compare with PCA, calibrate,
export; write the report and the ROC plot beside the runs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from bundle.manifest import BundleManifest
from training.baselines import DEFAULT_PCA_COMPONENTS
from training.config import ConfigError, EvaluationSettings, RunConfig, check_target_far
from training.data import build_splits
from training.evaluate import DEFAULT_TARGET_FAR
from training.plots import plot_roc
from training.run import load_run
from training.samples import write_samples
from training.workflows.compare import Comparison, compare
from training.workflows.export_run import export_run
from training.workflows.report import roc_title
from training.workflows.runs import ensure_run, softmax_twin, twin_dir

# The run folders inside --work: the bundled run and (twin_dir) its lambda-0 twin.
CENTER_RUN = "center"


@dataclass(frozen=True)
class BuildResult:
    manifest: BundleManifest
    comparison: Comparison
    report_path: Path
    roc_path: Path
    wall_seconds: float


def run_dirs(work_dir: Path) -> tuple[Path, Path]:
    """The bundled run's folder and its twin's, inside `work_dir`."""
    center = work_dir / CENTER_RUN
    return center, twin_dir(center)


def build_bundle(
    config: RunConfig,
    out: Path,
    *,
    work_dir: Path,
    settings: EvaluationSettings,
    target_far: float = DEFAULT_TARGET_FAR,
    pca_components: int | None = DEFAULT_PCA_COMPONENTS,
    name: str = "idembed",
    version: str = "1",
    verbose: int | str = 2,
    samples: int = 0,
) -> BuildResult:
    """Runs live in `work_dir` (`<work_dir>/center`, `<work_dir>/center-softmax`) and are reused when
    complete, so an interrupted build resumes cheaply. Writes `<work_dir>/evaluation.json` and
    `<work_dir>/roc.png`.
    """
    if config.center_lambda <= 0:
        raise ConfigError("--lambda must be > 0 for the bundled model (lambda = 0 is the softmax baseline)")
    check_target_far(target_far)
    started = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    splits = build_splits(config)
    center_dir, softmax_dir = run_dirs(work_dir)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    ensure_run(config, center_dir, verbose=verbose, splits=splits)
    seconds["train_center"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    ensure_run(softmax_twin(config), softmax_dir, verbose=verbose, splits=splits)
    seconds["train_softmax"] = round(time.perf_counter() - t, 2)
    run = load_run(center_dir)
    comparison = compare(
        run,
        softmax=load_run(softmax_dir),
        settings=settings,
        pca_components=pca_components,
        splits=splits,
    )
    comparison.seconds.update(seconds)
    manifest = export_run(
        run, out, comparison, target_far=target_far, name=name, version=version, splits=splits
    )
    if samples:
        test_names = [run.heldout_class_names[int(k)] for k in comparison.main.split.test_classes]
        write_samples(
            out,
            dataset=config.dataset,
            color_mode=config.color_mode,
            test_identities=test_names,
            count=samples,
            seed=config.seed,
        )
    wall = round(time.perf_counter() - started, 1)
    comparison.seconds["wall"] = wall
    report = work_dir / "evaluation.json"
    report.write_text(
        json.dumps({**comparison.to_json(), "thresholds": manifest.thresholds.model_dump()}, indent=2) + "\n"
    )
    roc = plot_roc(comparison.roc_curves(), work_dir / "roc.png", title=roc_title(config.dataset))
    return BuildResult(manifest, comparison, report, roc, wall)
