"""Benchmark: median train-step time of softmax + center loss (paper rule) vs softmax only.

Same backbone, same initial weights, same batch, same process. Steps of the two variants are timed in
interleaved blocks so that CPU contention from other processes hits both alike; the figure of merit is the
ratio of the medians (target <= 1.10). Prints a table and writes bench/results/train_step.json.

    python bench/train_step.py [--backbone lenetpp --image-size 28 --batch-size 128 --rounds 7 --steps 20]
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
from training.heads import make_head
from training.model import CenterLossModel

RESULTS = Path(__file__).parent / "results" / "train_step.json"


def make_step(rule: str, center_lambda: float, args: argparse.Namespace):
    keras.utils.set_random_seed(args.seed)  # identical initial weights for both variants
    shape = (args.image_size, args.image_size, 1)
    model = CenterLossModel(
        build_backbone(args.backbone, shape, args.feature_dim, args.width),
        make_head("softmax", args.num_classes),
        args.num_classes,
        center_lambda=center_lambda,
        alpha=0.5,
        rule=rule,
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.optimizer.build(model.trainable_variables)
    return tf.function(model.train_step, jit_compile=False)


def time_steps(step, batch, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        logs = step(batch)
        float(logs["loss"])  # wait for the step to finish, not just to be dispatched
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="lenetpp", choices=["lenetpp", "facecnn"])
    parser.add_argument("--image-size", type=int, default=28, help="input size (28 = MNIST, the paper's toy)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--feature-dim", type=int, default=2, help="2 = the paper's toy LeNet++")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant (tracing, caches)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved blocks per variant")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per block")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(args.batch_size, args.image_size, args.image_size, 1)).astype(np.float32)
    y = rng.integers(0, args.num_classes, size=args.batch_size).astype(np.int32)
    batch = (tf.constant(x), tf.constant(y))
    variants = {
        "softmax": make_step("none", 0.0, args),
        "softmax+center(paper)": make_step("paper", 0.01, args),
    }
    for step in variants.values():
        time_steps(step, batch, args.warmup)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            samples[name] += time_steps(step, batch, args.steps)

    medians = {name: statistics.median(t) for name, t in samples.items()}
    ratio = medians["softmax+center(paper)"] / medians["softmax"]
    print(f"{'variant':<24}{'median ms':>10}{'p90 ms':>10}{'steps':>7}")
    for name, t in samples.items():
        p90 = float(np.percentile(t, 90))
        print(f"{name:<24}{medians[name] * 1e3:>10.2f}{p90 * 1e3:>10.2f}{len(t):>7}")
    print(f"ratio center/softmax: {ratio:.3f} (target <= 1.10)")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": vars(args),
        "median_step_s": medians,
        "p90_step_s": {n: float(np.percentile(t, 90)) for n, t in samples.items()},
        "ratio": ratio,
        "target": 1.10,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "tensorflow": tf.__version__},
    }
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
