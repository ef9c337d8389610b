"""Head comparison on held-out digits: softmax vs margin heads, each with and without center loss.

Every variant trains the same backbone on digits 0-6 with the same seeds and epochs, then embeds the images
of the never-seen digits 7, 8, 9 and scores them with `training.evaluate` (same pairs for every variant):
EER, TAR at FAR 1e-2 / 1e-3 and ROC AUC, reported as mean and spread over the seeds.

    python bench/heads_compare.py                      # all heads, 3 seeds, 20 epochs
    python bench/heads_compare.py --heads softmax,arcface --seeds 0 --epochs 5
    python bench/heads_compare.py --heads asoftmax:lambda_base=100:lambda_gamma=1 --out /tmp/fast.json

Prints a markdown table and writes bench/results/heads_compare.json (per-seed numbers included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from training.baselines import PixelPCAEmbedder
from training.config import RunConfig
from training.data import build_splits
from training.evaluate import EvaluationSettings, evaluate_embeddings
from training.heads import check_head_options, parse_head_options
from training.run import load_run
from training.trainer import train

RESULTS = Path(__file__).resolve().parent / "results" / "heads_compare.json"
DEFAULT_HEADS = ("softmax", "asoftmax", "amsoftmax", "arcface")
HELDOUT = ["7", "8", "9"]
METRICS = ("eer", "tar_at_far_1e-02", "tar_at_far_1e-03", "roc_auc")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--heads",
        default=",".join(DEFAULT_HEADS),
        help="comma-separated heads, each optionally with options: arcface:s=32:m=0.4",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (one run per seed)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--feature-dim", type=int, default=32)
    parser.add_argument("--width", type=int, default=32, help="LeNet++ width (first conv stage)")
    parser.add_argument("--lambda", dest="center_lambda", type=float, default=0.01, help="center-loss weight")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    heads = []
    for spec in (h.strip() for h in args.heads.split(",") if h.strip()):
        name, *options = spec.split(":")
        try:
            params = parse_head_options(options)
            check_head_options(name, params)
        except ValueError as exc:
            parser.error(f"--heads {spec!r}: {exc}")
        heads.append((spec, name, params))
    args.heads = heads
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if args.epochs < 1 or args.center_lambda <= 0:
        parser.error("--epochs must be >= 1 and --lambda > 0 (the +center variants need a center weight)")
    return args


def _config(args: argparse.Namespace, head: str, params: dict, center: bool, seed: int) -> RunConfig:
    return RunConfig(
        dataset="digits",
        heldout_classes=HELDOUT,
        backbone="lenetpp",
        feature_dim=args.feature_dim,
        width=args.width,
        head=head,
        head_params=params,
        # lambda = 0 still tracks centers (paper rule) but they exert no pull: plain head training.
        center_lambda=args.center_lambda if center else 0.0,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=seed,
    )


def run_variant(
    args: argparse.Namespace, spec: tuple[str, str, dict], center: bool, seed: int, work: Path
) -> dict:
    """Train one variant with one seed and score its embeddings of the held-out digits."""
    label, head, params = spec
    config = _config(args, head, params, center, seed)
    splits = build_splits(config)
    started = time.perf_counter()
    folder = f"{label.replace(':', '_').replace('=', '-')}-{int(center)}-s{seed}"
    run_dir = train(config, work / folder, splits=splits, verbose=0)
    seconds = time.perf_counter() - started
    run = load_run(run_dir)
    embeddings = np.asarray(run.embedding(splits.x_heldout, training=False))
    evaluation = evaluate_embeddings(
        f"{label}{'+center' if center else ''}", embeddings, splits.y_heldout, EvaluationSettings(seed=seed)
    )
    summary = evaluation.summary()
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    return {
        "seed": seed,
        "train_seconds": round(seconds, 2),
        # Accuracy on held-back images of the seen digits: tells under-training from poor open-set transfer.
        "seen_val_accuracy": round(final.get("val_accuracy", float("nan")), 4),
        "pairs": [summary["num_genuine_pairs"], summary["num_impostor_pairs"]],
        **{m: summary[m] for m in METRICS},
    }


def pca_baseline(args: argparse.Namespace, seed: int) -> dict:
    """PCA on pixels fitted on the training digits (no learning): the floor every head should beat."""
    splits = build_splits(_config(args, "softmax", {}, False, seed))
    pca = PixelPCAEmbedder(args.feature_dim, seed=seed).fit(splits.x_train)
    evaluation = evaluate_embeddings(
        "pca-pixels", pca.embed(splits.x_heldout), splits.y_heldout, EvaluationSettings(seed=seed)
    )
    summary = evaluation.summary()
    return {
        "seed": seed,
        "train_seconds": 0.0,
        "seen_val_accuracy": float("nan"),
        "pairs": [summary["num_genuine_pairs"], summary["num_impostor_pairs"]],
        **{m: summary[m] for m in METRICS},
    }


def _mean_spread(values: list[float]) -> str:
    if any(not isinstance(v, float | int) or v != v for v in values):  # v != v: NaN, nothing measured
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    rows = [
        {
            "variant": f"PCA on pixels ({args.feature_dim} components)",
            "head": None,
            "head_params": {},
            "center": False,
            "runs": [pca_baseline(args, seed) for seed in args.seeds],
        }
    ]
    with tempfile.TemporaryDirectory(prefix="heads-compare-") as tmp:
        for spec in args.heads:
            label, head, params = spec
            for center in (False, True):
                per_seed = [run_variant(args, spec, center, seed, Path(tmp)) for seed in args.seeds]
                name = f"{label}{' + center' if center else ''}"
                rows.append(
                    {"variant": name, "head": head, "head_params": params, "center": center, "runs": per_seed}
                )
                print(f"done: {name} ({sum(r['train_seconds'] for r in per_seed):.1f} s)", file=sys.stderr)

    header = (
        "| variant | EER ↓ | TAR@FAR=1e-2 ↑ | TAR@FAR=1e-3 ↑ | ROC AUC ↑ | seen-digit val acc | train s/run |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for row in rows:
        cells = [_mean_spread([r[m] for r in row["runs"]]) for m in (*METRICS, "seen_val_accuracy")]
        seconds = statistics.fmean(r["train_seconds"] for r in row["runs"])
        print(f"| {row['variant']} | " + " | ".join(cells) + f" | {seconds:.1f} |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": {
            "dataset": "digits",
            "heldout": HELDOUT,
            "seeds": args.seeds,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "feature_dim": args.feature_dim,
            "width": args.width,
            "center_lambda": args.center_lambda,
            "numpy": np.__version__,
        },
        "rows": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
