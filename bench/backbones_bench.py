"""Benchmark: train-step images/s of the arcface_torch backbones, fp32 vs mixed precision.

One `CenterLossModel` per (backbone, precision): ArcFace head over `--num-classes` classes, center loss
(paper rule), Adam, a fixed random 112x112 RGB batch; the median of the timed steps after untimed warm-up
steps (tracing). Parameter counts are printed next to the arcface_torch reference's. Prints a table and
writes bench/results/backbones.json.

    python bench/backbones_bench.py --quick        # mobilefacenet + iresnet18, batch 8, 3 steps (~2 min)
    python bench/backbones_bench.py                # + iresnet50/100, batch 32, 10 steps (a quiet machine)
    python bench/backbones_bench.py --precisions fp32 mixed_float16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from training.backbones import build_backbone
from training.face_backbones import parameter_count, reference_parameter_count
from training.heads import make_head
from training.model import CenterLossModel
from training.precision import PRECISIONS, wrap_optimizer

RESULTS = Path(__file__).parent / "results" / "backbones.json"


def make_step(name: str, precision: str, args: argparse.Namespace):
    keras.utils.set_random_seed(args.seed)
    backbone = build_backbone(name, (112, 112, 3), args.feature_dim, precision=precision)
    model = CenterLossModel(
        backbone, make_head("arcface", args.num_classes), args.num_classes, center_lambda=0.01, rule="paper"
    )
    model.compile(optimizer=wrap_optimizer(keras.optimizers.Adam(1e-3), precision))
    model.optimizer.build(model.trainable_variables)
    return tf.function(model.train_step, jit_compile=False), backbone


def time_steps(step, batch, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        float(step(batch)["loss"])  # wait for the step to finish, not just to be dispatched
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=None)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "mixed_bfloat16"], choices=PRECISIONS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--feature-dim", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="mobilefacenet + iresnet18, batch 8, 3 steps")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.steps, args.warmup = 8, 3, 1
    names = args.backbones or (
        ["mobilefacenet", "iresnet18"]
        if args.quick
        else ["mobilefacenet", "iresnet18", "iresnet50", "iresnet100"]
    )

    rng = np.random.default_rng(args.seed)
    x = rng.random((args.batch_size, 112, 112, 3), dtype=np.float32)
    y = rng.integers(0, args.num_classes, args.batch_size).astype(np.int32)
    batch = (tf.constant(x), tf.constant(y))
    rows = []
    for name in names:
        for precision in args.precisions:
            step, backbone = make_step(name, precision, args)
            time_steps(step, batch, args.warmup)
            times = time_steps(step, batch, args.steps)
            median = statistics.median(times)
            rows.append(
                {
                    "backbone": name,
                    "precision": precision,
                    "params": parameter_count(backbone),
                    "reference_params": reference_parameter_count(name, args.feature_dim),
                    "median_step_s": median,
                    "images_per_s": args.batch_size / median,
                    "steps": len(times),
                }
            )
            print(f"  {name} {precision}: {median * 1e3:.0f} ms/step", flush=True)
            del step, backbone
            keras.backend.clear_session()

    print(f"\n{'backbone':<15}{'precision':<16}{'params M':>9}{'ref M':>8}{'ms/step':>9}{'img/s':>8}")
    for r in rows:
        print(
            f"{r['backbone']:<15}{r['precision']:<16}{r['params'] / 1e6:>9.2f}"
            f"{r['reference_params'] / 1e6:>8.2f}{r['median_step_s'] * 1e3:>9.0f}{r['images_per_s']:>8.1f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": vars(args),
        "rows": rows,
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "tensorflow": tf.__version__,
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        },
    }
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
