"""Train -> evaluate against baselines -> calibrate -> export: the steps behind `evaluate`, `export` and
`build-bundle`, as plain functions the CLI (and tests) call.

One split serves every embedder: the softmax + center run, its softmax-only twin (same config, lambda = 0)
and PCA on pixels are all scored on the same held-out identities and the same seeded pairs, so the table
compares like with like.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from bundle.files import load_bundle
from bundle.manifest import BundleManifest, Thresholds, TrainingRecipe
from training.baselines import DEFAULT_PCA_COMPONENTS, PixelPCAEmbedder
from training.config import RunConfig
from training.data import Splits, build_splits
from training.evaluate import (
    DEFAULT_TARGET_FAR,
    EvaluationSettings,
    OpenSetEvaluation,
    calibrate_out_of_sample,
    evaluate_embeddings,
    measure_at,
)
from training.export import PARITY_TOLERANCE, export_bundle, onnx_embed
from training.plots import FeaturePanel, RocCurve, plot_feature_panels, plot_roc
from training.run import RunError, RunPaths, TrainedRun, load_run
from training.samples import write_samples
from training.trainer import train

CENTER = "softmax+center"
SOFTMAX = "softmax"


def run_label(config: RunConfig) -> str:
    """How reports name a run: its head, and `+center` when the center loss is on (`arcface+center`)."""
    return f"{config.head}+center" if config.center_lambda > 0 else config.head


PCA = "pca-pixels"
EMBED_BATCH = 512
# The parity check runs on this many real held-out images (the whole held-out set when smaller).
PARITY_BATCH = 256


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


@dataclass(frozen=True)
class Comparison:
    """Open-set results of the trained model and its baselines on one held-out split."""

    dataset: str
    train_classes: list[str]
    heldout_classes: list[str]
    settings: EvaluationSettings
    evaluations: dict[str, OpenSetEvaluation]  # the run first, then the baselines that were run
    # name of the lambda-0 twin among `evaluations` (its head alone, e.g. "softmax" or "arcface"), if run
    twin: str | None = None
    # every network's head and center-loss weight, by name, so a report says exactly what each row is
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # The same protocol on validation images of the TRAINING identities: shows what the loss does where it
    # was trained, next to how much of it carries over to unseen identities.
    seen: dict[str, OpenSetEvaluation] = field(default_factory=dict)

    @property
    def main(self) -> OpenSetEvaluation:
        return next(iter(self.evaluations.values()))

    def protocol(self) -> str:
        """One sentence saying which identities every number is measured on."""
        text = (
            f"pairs on {len(self.heldout_classes)} identities unseen in training "
            f"({_shown(self.heldout_classes)}), seed {self.settings.seed}"
        )
        split = self.main.split
        if split.has_calibration:
            text += (
                f"; thresholds chosen on {len(split.calibration_classes)} of them (calibration identities) "
                f"and measured on the other {len(split.test_classes)} (test identities)"
            )
        return text

    def eer_ratio(self) -> float | None:
        """EER of softmax + center divided by EER of softmax-only (goal: <= 0.7)."""
        if self.twin is None or self.twin not in self.evaluations:
            return None
        soft = self.evaluations[self.twin].verification.eer
        return self.main.verification.eer / soft if soft > 0 else None

    def rows(self) -> list[dict[str, Any]]:
        return [{**e.as_dict(), **self.recipes.get(name, {})} for name, e in self.evaluations.items()]

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "train_classes": self.train_classes,
            "heldout_classes": self.heldout_classes,
            "protocol": self.settings.as_dict(),
            "results": self.rows(),
            "seen_identities": [e.as_dict() for e in self.seen.values()],
            "eer_ratio_center_over_softmax": self.eer_ratio(),
            "seconds": self.seconds,
        }

    def manifest_evaluation(self) -> dict[str, Any]:
        """The manifest's `evaluation`: the bundled model's numbers at top level, baselines nested."""
        out: dict[str, Any] = {
            "protocol": self.protocol(),
            # The knobs that reproduce these numbers (`check_bundle` re-measures with them).
            "protocol_settings": {
                k: v for k, v in self.settings.as_dict().items() if isinstance(v, int | float | str)
            },
            **self.main.summary(),
        }
        for name, ev in list(self.evaluations.items())[1:]:
            out[f"baseline_{name}"] = ev.summary()
        ratio = self.eer_ratio()
        if ratio is not None:
            out["eer_ratio_center_over_softmax"] = round(ratio, 4)
        if self.seen:
            out["seen_identities_eer"] = {n: round(e.verification.eer, 6) for n, e in self.seen.items()}
        return out

    def roc_curves(self) -> list[RocCurve]:
        return [
            RocCurve(
                name, e.verification.roc_fpr, e.verification.roc_tpr, e.verification.auc, e.verification.eer
            )
            for name, e in self.evaluations.items()
        ]


def compare(
    run: TrainedRun,
    *,
    softmax: TrainedRun | None,
    settings: EvaluationSettings,
    pca_components: int | None = DEFAULT_PCA_COMPONENTS,
    splits: Splits | None = None,
) -> Comparison:
    """Score the run, its softmax-only twin (if given) and PCA on pixels (if `pca_components`) on the held-out
    identities of the run's own split."""
    splits = splits if splits is not None else run.splits()
    if softmax is not None and run.config.center_lambda == 0:
        raise ValueError(f"{run.path} is itself softmax-only (lambda 0); it needs no softmax baseline")
    if softmax is not None and softmax.heldout_class_names != run.heldout_class_names:
        raise ValueError(
            f"softmax baseline {softmax.path} held out {softmax.heldout_class_names}, "
            f"the run held out {run.heldout_class_names}: not the same split"
        )
    labels = splits.y_heldout
    evaluations: dict[str, OpenSetEvaluation] = {}
    seconds: dict[str, float] = {}
    embedders: list[tuple[str, Any]] = [(run_label(run.config), run.embedding)]
    recipes = {run_label(run.config): {"head": run.config.head, "lambda": run.config.center_lambda}}
    twin = None
    if softmax is not None:
        twin = run_label(softmax.config)
        embedders.append((twin, softmax.embedding))
        recipes[twin] = {"head": softmax.config.head, "lambda": softmax.config.center_lambda}
    seen: dict[str, OpenSetEvaluation] = {}
    val_ok = len(np.unique(splits.y_val)) >= 2 and np.bincount(splits.y_val).max() >= 2
    for name, model in embedders:
        started = time.perf_counter()
        evaluations[name] = evaluate_embeddings(
            name, embed(model, splits.x_heldout), labels, settings, groups=splits.heldout_groups
        )
        if val_ok:
            seen[name] = evaluate_embeddings(name, embed(model, splits.x_val), splits.y_val, settings)
        seconds[f"evaluate_{name}"] = round(time.perf_counter() - started, 2)
    if pca_components:
        started = time.perf_counter()
        # Fitted on training identities only: the held-out ones stay unseen, as for the networks.
        pca = PixelPCAEmbedder(pca_components, seed=settings.seed).fit(splits.x_train)
        evaluations[PCA] = evaluate_embeddings(
            PCA, pca.embed(splits.x_heldout), labels, settings, groups=splits.heldout_groups
        )
        seconds[f"evaluate_{PCA}"] = round(time.perf_counter() - started, 2)
    return Comparison(
        dataset=run.config.dataset,
        train_classes=run.class_names,
        heldout_classes=run.heldout_class_names,
        settings=settings,
        evaluations=evaluations,
        seconds=seconds,
        seen=seen,
        twin=twin,
        recipes=recipes,
    )


def calibrate(evaluation: OpenSetEvaluation, target_far: float, min_errors: int) -> Thresholds:
    """The manifest thresholds: chosen on held-out calibration identities, measured on the test ones."""
    return calibrate_out_of_sample(evaluation, target_far=target_far, min_errors=min_errors)


# RunConfig fields the TrainingRecipe already carries (under these or its own names).
_RECIPE_FIELDS = frozenset(
    {"backbone", "head", "head_params", "rule", "center_lambda", "alpha", "epochs", "batch_size", "seed"}
    | {"dataset", "heldout_classes", "val_fraction"}
)


def recipe_of(run: TrainedRun) -> TrainingRecipe:
    c = run.config
    return TrainingRecipe(
        backbone=c.backbone,
        head=c.head,
        head_params=dict(c.head_params),
        center_update=c.rule,
        center_lambda=c.center_lambda,
        center_alpha=c.alpha,
        epochs=c.epochs,
        batch_size=c.batch_size,
        seed=c.seed,
        dataset=c.dataset,
        train_classes=run.class_names,
        heldout_classes=run.heldout_class_names,
        val_fraction=c.val_fraction,
        # Everything the fields above do not already say, so the recipe re-runs exactly.
        options={
            k: v
            for k, v in c.model_dump().items()
            if k not in _RECIPE_FIELDS and isinstance(v, float | int | str | bool | None)
        }
        # Options are scalars: the held-out groups travel comma-joined (RunConfig forbids commas in them).
        | ({} if c.heldout_groups is None else {"heldout_groups": ",".join(c.heldout_groups)}),
    )


def export_run(
    run: TrainedRun,
    out: Path,
    comparison: Comparison,
    *,
    target_far: float = DEFAULT_TARGET_FAR,
    name: str = "idembed",
    version: str = "1",
    tolerance: float = PARITY_TOLERANCE,
    splits: Splits | None = None,
    quantize: str | None = None,
    quantize_method: str = "static",
    embed_preprocessing: bool = False,
) -> BundleManifest:
    """Calibrate on the comparison's held-out pairs and write the run as a bundle (parity-checked).

    `quantize="int8"`: the bundle holds an int8 graph, written only if its held-out EER is within
    `training.quantize.MAX_EER_INCREASE` of fp32; its thresholds and evaluation are the int8 model's."""
    splits = splits if splits is not None else run.splits()
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize must be int8 (or omitted), got {quantize!r}")
    thresholds = calibrate(comparison.main, target_far, comparison.settings.min_errors)
    hook = None
    if quantize == "int8":
        hook = _int8_hook(run, comparison, splits, target_far=target_far, method=quantize_method)
    rng = np.random.default_rng(comparison.settings.seed)
    pick = rng.choice(len(splits.x_heldout), min(PARITY_BATCH, len(splits.x_heldout)), replace=False)
    return export_bundle(
        out,
        model=run.embedding,
        centers=run.centers,
        labels=run.class_names,
        parity_batch=splits.x_heldout[np.sort(pick)],
        input_spec=run.input_spec,
        preprocessing=run.preprocessing,
        thresholds=thresholds,
        recipe=recipe_of(run),
        evaluation=comparison.manifest_evaluation(),
        name=name,
        version=version,
        tolerance=tolerance,
        quantize=hook,
        embed_preprocessing=embed_preprocessing,  # inputgraph: the ONNX model normalises uint8 pixels itself
    )


def _int8_hook(run: TrainedRun, comparison: Comparison, splits: Splits, *, target_far: float, method: str):
    """fp32 ONNX bytes -> the int8 graph with its own evaluation and thresholds (or a refusal)."""
    from dataclasses import replace

    from training import quantize as q

    settings = comparison.settings
    labels = splits.y_heldout
    gate_settings = replace(settings, calibration_repeats=1, episodes=0)

    def hook(fp32: bytes) -> q.Quantized:
        rng = np.random.default_rng(settings.seed)
        pick = rng.choice(len(splits.x_train), min(q.CALIBRATION_IMAGES, len(splits.x_train)), replace=False)
        gate = q.quantize_gated(
            fp32,
            heldout=splits.x_heldout,
            fp32_eer=comparison.main.verification.eer,
            eer_of=lambda emb: evaluate_embeddings("int8", emb, labels, gate_settings).verification.eer,
            input_name=run.input_spec.name,
            method=method,
            calibration=splits.x_train[np.sort(pick)],
            max_eer_increase=q.MAX_EER_INCREASE,
        )
        main = next(iter(comparison.evaluations))
        ev8 = evaluate_embeddings(main, gate.int8_embeddings, labels, settings, groups=splits.heldout_groups)
        as_int8 = replace(comparison, evaluations={**comparison.evaluations, main: ev8}, seen={})
        evaluation = as_int8.manifest_evaluation()
        evaluation["quantized_from_fp32_eer"] = round(gate.fp32_eer, 6)
        return q.Quantized(
            gate.int8_bytes, calibrate(ev8, target_far, settings.min_errors), evaluation, gate.record
        )

    return hook


def roc_title(dataset: str) -> str:
    label = dataset if dataset in ("digits", "digit-pairs") else Path(dataset).name
    return f"ROC on unseen {label} identities"


@dataclass(frozen=True)
class BuildResult:
    manifest: BundleManifest
    comparison: Comparison
    report_path: Path
    roc_path: Path
    wall_seconds: float


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
    """The one command: train softmax + center and its softmax twin, compare with PCA, calibrate, export.

    Runs live in `work_dir` (`<work_dir>/center`, `<work_dir>/center-softmax`) and are reused when complete,
    so an interrupted build resumes cheaply. Writes `<work_dir>/evaluation.json` and `<work_dir>/roc.png`.
    """
    if config.center_lambda <= 0:
        raise ValueError("--lambda must be > 0 for the bundled model (lambda = 0 is the softmax baseline)")
    started = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    splits = build_splits(config)
    center_dir = work_dir / "center"
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    ensure_run(config, center_dir, verbose=verbose, splits=splits)
    seconds["train_center"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    ensure_run(softmax_twin(config), twin_dir(center_dir), verbose=verbose, splits=splits)
    seconds["train_softmax"] = round(time.perf_counter() - t, 2)
    run = load_run(center_dir)
    comparison = compare(
        run,
        softmax=load_run(twin_dir(center_dir)),
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


_TABLE_COLUMNS = (
    ("EER", "eer"),
    ("ROC AUC", "roc_auc"),
    ("TAR@FAR=1e-2", "tar_at_far_1e-02"),
    ("TAR@FAR=1e-3", "tar_at_far_1e-03"),
    ("10-fold acc", "kfold_accuracy_mean"),
    ("rank-1", "rank1"),
    ("DIR@FAR=1e-1", "dir_at_far_1e-01"),
    ("episodes acc", "episodes"),
    ("test FAR @ thr(1e-3)", "test_far_at_calibrated_1e-03"),
    ("test TAR @ thr(1e-3)", "test_tar_at_calibrated_1e-03"),
)


def _shown(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def markdown_table(comparison: Comparison) -> str:
    """The comparison as a Markdown table (printed by the CLI, pasted into the docs)."""

    def cell(row: dict[str, Any], key: str) -> str:
        if key == "episodes":  # its key names the protocol, e.g. episodes_20way_1shot_within_group_accuracy
            key = next((k for k in row if k.startswith("episodes_") and k.endswith("_accuracy")), key)
        value = row.get(key, "n/a")
        if key == "kfold_accuracy_mean" and isinstance(value, float):
            return f"{value:.3f} ± {row['kfold_accuracy_std']:.3f}"
        if isinstance(value, float):
            return f"{value:.3f}"
        return "n/a" if isinstance(value, str) else str(value)

    header = "| embedder | " + " | ".join(title for title, _ in _TABLE_COLUMNS) + " |"
    lines = [
        f"Unseen identities ({_shown(comparison.heldout_classes)}):",
        "",
        header,
        "|" + "---|" * (len(_TABLE_COLUMNS) + 1),
    ]
    for row in comparison.rows():
        label = row["name"] + (f" (λ={row['lambda']:g})" if "lambda" in row else "")
        lines.append(f"| {label} | " + " | ".join(cell(row, key) for _, key in _TABLE_COLUMNS) + " |")
    episode_keys = {k for row in comparison.rows() for k in row if k.endswith("_accuracy") and "way_" in k}
    if episode_keys:
        lines.append(
            f"\nepisodes: {', '.join(sorted(k.removeprefix('episodes_')[:-9] for k in episode_keys))}"
        )
    split = comparison.main.split
    if split.has_calibration:
        lines.append(
            f"thresholds chosen on {len(split.calibration_classes)} calibration identities, "
            f"FAR/TAR measured on the {len(split.test_classes)} test identities"
        )
    ratio = comparison.eer_ratio()
    if ratio is not None:
        lines.append(f"\nEER {comparison.main.name} / {comparison.twin} = {ratio:.2f} (goal <= 0.70)")
    if comparison.seen:
        seen = ", ".join(f"{n} {e.verification.eer:.3f}" for n, e in comparison.seen.items())
        lines.append(f"EER on validation images of the training identities (seen): {seen}")
    return "\n".join(lines)


def feature_figure(config: RunConfig, work_dir: Path, out_png: Path, *, verbose: int | str = 2) -> Path:
    """The paper's Figure 3 on our data: 2-D features of the training identities, lambda = 0 vs lambda > 0.

    Trains two LeNet++-style runs with 2-D features (the config otherwise unchanged), reusing finished runs in
    `work_dir`, and plots each run's training-identity features coloured by class with its centers, and the
    held-out identities in grey (where unseen identities land is what open-set evaluation measures).
    """
    if config.center_lambda <= 0:
        raise ValueError("--lambda must be > 0: the right-hand panel shows the center-loss run")
    base = config.model_copy(update={"feature_dim": 2})
    splits = build_splits(base)
    x = np.concatenate([splits.x_train, splits.x_val])
    y = np.concatenate([splits.y_train, splits.y_val])
    panels = []
    for lam in (0.0, config.center_lambda):
        run_dir = work_dir / f"features2d-lambda{lam:g}"
        ensure_run(base.model_copy(update={"center_lambda": lam}), run_dir, verbose=verbose, splits=splits)
        run = load_run(run_dir)
        title = "softmax only (λ = 0)" if lam == 0 else f"softmax + center loss (λ = {lam:g})"
        panels.append(
            FeaturePanel(
                title,
                embed(run.embedding, x),
                y,
                run.class_names,
                run.centers,
                unseen=embed(run.embedding, splits.x_heldout),
                unseen_label=f"unseen ({', '.join(splits.heldout_class_names)})",
            )
        )
    return plot_feature_panels(panels, out_png)


def config_from_recipe(recipe: TrainingRecipe) -> RunConfig:
    """The RunConfig a bundle was trained with, rebuilt from its manifest (to re-run or re-split it)."""
    known = set(RunConfig.model_fields)
    options = {k: v for k, v in recipe.options.items() if k in known}
    if isinstance(options.get("heldout_groups"), str):
        options["heldout_groups"] = options["heldout_groups"].split(",")
    # A split drawn by a rule (groups, or a seeded count) is re-drawn by that rule, which gives the same
    # identities; the names alone would contradict the rule's options ("not both").
    by_rule = any(
        options.get(k) is not None for k in ("heldout_groups", "heldout_group_count", "heldout_count")
    )
    return RunConfig.from_options(
        **options,
        dataset=recipe.dataset,
        heldout_classes=None if by_rule else recipe.heldout_classes,
        val_fraction=recipe.val_fraction,
        backbone=recipe.backbone,
        head=recipe.head,
        head_params=dict(recipe.head_params),
        center_lambda=recipe.center_lambda,
        alpha=recipe.center_alpha,
        rule=recipe.center_update,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        seed=recipe.seed,
    )


@dataclass(frozen=True)
class BundleCheck:
    """A bundle's manifest numbers next to the same numbers re-measured from its own ONNX model."""

    rows: list[tuple[str, float, float]]  # (metric, manifest, measured)
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(abs(a - b) <= self.tolerance for _, a, b in self.rows)


def check_bundle(path: Path, *, tolerance: float = 1e-3) -> BundleCheck:
    """Re-score the bundle's held-out identities with its ONNX model (as the service runs it) under the
    protocol recorded in its manifest; the manifest can be trusted when every number agrees within
    `tolerance` (float32 inference may flip pairs that sit exactly on a threshold, nothing more)."""
    bundle = load_bundle(path)
    m = bundle.manifest
    recorded = m.evaluation.get("protocol_settings")
    settings = EvaluationSettings(**recorded) if isinstance(recorded, dict) else EvaluationSettings()
    if m.provenance is not None:  # imported: no training recipe to re-run, its folder split instead
        from training.import_onnx import heldout_inputs

        x_held, y_held = heldout_inputs(m)
        features = onnx_embed(bundle.model_bytes, x_held, m.input.name)
        ev = evaluate_embeddings(CENTER, features, y_held, settings)
    else:
        splits = build_splits(config_from_recipe(m.training))
        features = onnx_embed(bundle.model_bytes, splits.x_heldout, m.input.name)
        ev = evaluate_embeddings(CENTER, features, splits.y_heldout, settings, groups=splits.heldout_groups)
    measured = ev.summary()
    rows = [
        (key, float(m.evaluation[key]), float(measured[key]))
        for key in ("eer", "roc_auc", "kfold_accuracy_mean", "tar_at_far_1e-02")
        if isinstance(m.evaluation.get(key), int | float) and isinstance(measured.get(key), int | float)
    ]
    if ev.calibration_scores is not None and ev.calibration_pairs is not None:
        cal_scores, cal_same = ev.calibration_scores, ev.calibration_pairs.same
    else:  # a bundle calibrated before out-of-sample calibration existed: on all held-out pairs
        cal_scores, cal_same = ev.scores, ev.pairs.same
    for name, point in (
        ("threshold_default", m.thresholds.at_target_far),
        ("threshold_eer", m.thresholds.eer),
    ):
        got = measure_at(cal_scores, cal_same, point.threshold)
        rows += [(f"{name}.far", point.far, got.far), (f"{name}.tar", point.tar, got.tar)]
    oos = m.thresholds.out_of_sample
    if oos is not None and ev.test_scores is not None and ev.test_pairs is not None:
        for name, checked in (("test_default", oos.at_default), ("test_eer", oos.at_eer)):
            got = measure_at(ev.test_scores, ev.test_pairs.same, checked.threshold)
            rows += [(f"{name}.far", checked.far, got.far), (f"{name}.tar", checked.tar, got.tar)]
    return BundleCheck(rows, tolerance)
