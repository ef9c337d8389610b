"""Omniglot benchmark: new characters of alphabets never seen in training, several held-out alphabet sets.

For each held-out pair of alphabets (the rest train), five embedders are scored on the same seeded pairs,
calibration/test identities and episodes (`training.evaluate`): PCA on pixels, softmax, softmax + center,
ArcFace, ArcFace + center — every network from the `omniglot` recipe (training/recipes/omniglot.json) with
only the head and lambda changed. Reported per split and as mean ± std over splits: EER, TAR at FAR 1e-2 and
1e-3 (read off the ROC), 20-way 1-shot within-alphabet accuracy, rank-1, and the test identities' FAR/TAR at
the threshold calibrated on the other held-out identities. Goals (issue 12): softmax + center EER <= 0.7x
softmax; 20-way 1-shot within-alphabet error <= 8 %.

    python bench/omniglot.py                               # 3 splits x 4 trainings, ~25 min on 2 cores
    python bench/omniglot.py --splits Korean+Tagalog --epochs 3 --out /tmp/o.json      # a quick look

Finished runs in --work are reused (delete the folder to retrain). Needs ../shared/data/omniglot (see
docs/omniglot.md); exits 2 naming the folder when it is absent. Writes bench/results/omniglot.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "omniglot.json"
DATA = ROOT.parent / "shared" / "data" / "omniglot"
# Each held-out set keeps one alphabet with >= 20 characters, so 20-way within-alphabet episodes exist.
DEFAULT_SPLITS = ("Korean+Tagalog", "Japanese_(katakana)+Early_Aramaic", "Sanskrit+Balinese")
# (label, head options, lambda) of the four networks; ArcFace's scale 30 and margin warm-up: see docs.
NETWORKS: tuple[tuple[str, dict[str, Any], float], ...] = (
    ("softmax", {"head": "softmax", "head_params": {}}, 0.0),
    ("softmax+center", {"head": "softmax", "head_params": {}}, -1.0),  # -1: the recipe's lambda
    ("arcface", {"head": "arcface", "head_params": {"s": 30.0, "m": 0.5, "warmup_epochs": 5.0}}, 0.0),
    ("arcface+center", {"head": "arcface", "head_params": {"s": 30.0, "m": 0.5, "warmup_epochs": 5.0}}, -1.0),
)
COLUMNS = (
    ("EER", "eer"),
    ("TAR@1e-2", "tar_at_far_1e-02"),
    ("TAR@1e-3", "tar_at_far_1e-03"),
    ("20-way 1-shot", "episodes_20way_1shot_within_group_accuracy"),
    ("rank-1", "rank1"),
    ("test FAR @ thr(1e-3)", "test_far_at_calibrated_1e-03"),
    ("test TAR @ thr(1e-3)", "test_tar_at_calibrated_1e-03"),
)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", default=",".join(DEFAULT_SPLITS), help="held-out sets: A+B,C+D,...")
    p.add_argument("--data", type=Path, default=DATA, help="the Omniglot zips' folder")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--lambda", dest="center_lambda", type=float, default=None, help="override lambda")
    p.add_argument("--recipe", default="omniglot", help="recipe whose train options every network uses")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "omniglot-bench")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if not args.data.is_dir():
        print(f"error: {args.data} not found: this benchmark needs the Omniglot zips (docs/omniglot.md)")
        return 2
    from training.config import RunConfig
    from training.data import build_splits
    from training.evaluate import EvaluationSettings
    from training.recipes import load_recipe
    from training.run import load_run
    from training.workflows.compare import PCA, compare
    from training.workflows.report import markdown_table
    from training.workflows.runs import ensure_run

    recipe = load_recipe(args.recipe)
    settings = EvaluationSettings(**recipe.evaluation)
    started = time.perf_counter()
    per_split: list[dict[str, Any]] = []
    for split in (s.strip() for s in args.splits.split(",") if s.strip()):
        groups = split.split("+")
        base = {**recipe.train, "dataset": str(args.data), "heldout_groups": groups}
        if args.epochs is not None:
            base["epochs"] = args.epochs
        lam = args.center_lambda if args.center_lambda is not None else base["center_lambda"]
        configs = {
            label: RunConfig.from_options(
                **{**base, **head, "center_lambda": lam if lam_sel < 0 else lam_sel}
            )
            for label, head, lam_sel in NETWORKS
        }
        splits = build_splits(configs["softmax"])
        seconds: dict[str, float] = {}
        for label, config in configs.items():
            t = time.perf_counter()
            ensure_run(config, args.work / split / label, verbose=0, splits=splits)
            seconds[label] = round(time.perf_counter() - t, 1)
            print(f"[{split}] {label}: trained in {seconds[label]} s", flush=True)
        runs = {label: load_run(args.work / split / label) for label in configs}
        softmax_cmp = compare(
            runs["softmax+center"], softmax=runs["softmax"], settings=settings, splits=splits
        )
        arc_cmp = compare(
            runs["arcface+center"],
            softmax=runs["arcface"],
            settings=settings,
            pca_components=0,
            splits=splits,
        )
        print(markdown_table(softmax_cmp), "\n", markdown_table(arc_cmp), flush=True)
        rows: dict[str, dict[str, Any]] = {}
        for cmp in (softmax_cmp, arc_cmp):
            for row in cmp.rows():
                rows[row["name"]] = row
        rows = {name: rows[name] for name in (PCA, *configs)}
        per_split.append(
            {
                "heldout_alphabets": groups,
                "heldout_characters": len(splits.heldout_class_names),
                "train_characters": len(splits.class_names),
                "rows": rows,
                "train_seconds": seconds,
                "eer_ratio_center_over_softmax": softmax_cmp.eer_ratio(),
                "eer_ratio_arcface_center_over_arcface": arc_cmp.eer_ratio(),
            }
        )
    summary = _summary(per_split)
    report = {
        "recipe": str(recipe.path.relative_to(ROOT))
        if recipe.path.is_relative_to(ROOT)
        else str(recipe.path),
        "protocol": settings.as_dict(),
        "splits": per_split,
        "summary": summary,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(_table(summary, len(per_split)))
    print(f"wrote {args.out} ({report['wall_seconds']:.0f} s)")
    return 0


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def _summary(per_split: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(per_split[0]["rows"])
    out: dict[str, Any] = {}
    for name in names:
        out[name] = {}
        for _, key in COLUMNS:
            values = [s["rows"][name].get(key) for s in per_split]
            if all(isinstance(v, int | float) for v in values):
                out[name][key] = _stats([float(v) for v in values])
    ratios = [s["eer_ratio_center_over_softmax"] for s in per_split if s["eer_ratio_center_over_softmax"]]
    out["eer_ratio_center_over_softmax"] = _stats(ratios) if ratios else None
    arc = [s["eer_ratio_arcface_center_over_arcface"] for s in per_split]
    out["eer_ratio_arcface_center_over_arcface"] = _stats([r for r in arc if r]) if any(arc) else None
    return out


def _table(summary: dict[str, Any], n: int) -> str:
    lines = [
        f"Omniglot, held-out alphabets, mean ± std over {n} splits:",
        "",
        "| embedder | " + " | ".join(t for t, _ in COLUMNS) + " |",
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for name, metrics in summary.items():
        if not isinstance(metrics, dict) or "eer" not in metrics:
            continue
        cells = [
            f"{metrics[key]['mean']:.3g} ± {metrics[key]['std']:.2g}" if key in metrics else "n/a"
            for _, key in COLUMNS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key in ("eer_ratio_center_over_softmax", "eer_ratio_arcface_center_over_arcface"):
        r = summary.get(key)
        if r:
            lines.append(f"\n{key}: {r['mean']:.2f} ({r['min']:.2f}–{r['max']:.2f}); goal <= 0.70")
    ep = summary.get("softmax+center", {}).get("episodes_20way_1shot_within_group_accuracy")
    if ep:
        lines.append(f"softmax+center 20-way 1-shot error {1 - ep['mean']:.3f}; goal <= 0.08")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
