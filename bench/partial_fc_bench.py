"""Benchmark: Partial FC train step at 1k, 100k and 1M classes (10 % sampling): step time and memory.

Each class count runs in its own process (so peak RSS is that configuration's): `PartialFCModel` with
ArcFace, center loss (paper rule, sparse updates), Adam (lazy rows), MobileFaceNet at 112x112, a random
batch whose labels are drawn from all K classes. Reported: median step time, its ratio to the 1k-class
step (target: 100k <= 1.5x; also timed interleaved in one process, the fair figure on a shared
machine), peak RSS, and the bytes of the model's variables (weights, the head's
`[K, D]` rows and their two Adam slots, the centers). Prints a table and writes
bench/results/partial_fc.json.

    python bench/partial_fc_bench.py --quick      # 128-d embedding, batch 16, 4 steps (~2-3 min, ~3 GB)
    python bench/partial_fc_bench.py              # 512-d, batch 64, 10 steps (1M classes: ~9 GB RAM)
    python bench/partial_fc_bench.py --full-head  # adds the dense head at 1k and 100k for comparison
    python bench/partial_fc_bench.py --quick --head-only   # the head alone (Dense "backbone"), batch 64
    python bench/partial_fc_bench.py --quick --shard-memory  # head state per worker, 1 vs 2 workers

`--shard-memory` (issue 13, model-parallel Partial FC): 100k classes, head only, trained by 1 and by 2
MultiWorkerMirroredStrategy worker processes on 127.0.0.1, replicated (`PartialFCModel`) and sharded
(`--shard-classes`, `training/sharded_fc.py`). Each worker reports the bytes of head state it stores
(weights, 2 Adam slots, centers), its RSS after building and its peak RSS, and the step time. Writes
bench/results/partial_fc_shards.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS_DIR = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _build(k: int, dense: bool, args: argparse.Namespace):
    import keras

    from training.backbones import build_backbone
    from training.heads import make_head
    from training.model import CenterLossModel
    from training.partial_fc import build_partial_fc

    keras.utils.set_random_seed(args.seed)
    if args.head_only:
        # The head's own cost: a single Dense layer stands in for the backbone, inputs are D-d vectors.
        inputs = keras.Input((args.feature_dim,), name="input")
        backbone = keras.Model(inputs, keras.layers.Dense(args.feature_dim, name="embedding")(inputs))
    else:
        backbone = build_backbone(args.backbone, (112, 112, 3), args.feature_dim)
    options = dict(center_lambda=0.01, alpha=0.5, rule="paper", center_lr=0.5)
    if dense:
        model = CenterLossModel(backbone, make_head("arcface", k), k, **options)
    else:
        model = build_partial_fc(
            backbone,
            k,
            head="arcface",
            head_params={},
            sample_rate=args.sample_rate,
            seed=args.seed,
            optimizer="adam",
            **options,
        )
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.optimizer.build(model.trainable_variables)
    return model


def _batches(k: int, n: int, args: argparse.Namespace):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(args.seed)
    shape = (args.feature_dim,) if args.head_only else (112, 112, 3)
    x = tf.constant(rng.random((args.batch_size, *shape), dtype=np.float32))
    return [(x, tf.constant(rng.integers(0, k, args.batch_size).astype(np.int32))) for _ in range(n)]


def _timed(step, batches) -> list[float]:
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        float(step(batch)["loss"])  # wait for the step to finish, not just to be dispatched
        times.append(time.perf_counter() - t0)
    return times


def run_one(args: argparse.Namespace) -> dict:
    """One configuration in this process (so peak RSS is its own); returns its measurements."""
    import numpy as np
    import tensorflow as tf

    k = args.one
    model = _build(k, args.dense, args)
    variable_bytes = sum(int(np.prod(v.shape)) * 4 for v in model.weights)
    variable_bytes += sum(int(np.prod(v.shape)) * 4 for v in model.optimizer.variables)
    rss_built = _rss_mb()
    batches = _batches(k, args.warmup + args.steps, args)
    step = tf.function(model.train_step, jit_compile=False)
    _timed(step, batches[: args.warmup])
    times = _timed(step, batches[args.warmup :])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "classes": k,
        "head": "full" if args.dense else f"partial_fc {args.sample_rate:g}",
        "median_step_s": statistics.median(times),
        "steps": len(times),
        "variable_mb": variable_bytes / 2**20,
        "rss_built_mb": rss_built,
        "peak_rss_mb": peak_mb,
    }


def run_pair(args: argparse.Namespace) -> dict:
    """1k vs 100k classes in ONE process, steps timed in interleaved blocks so that load from other
    processes hits both alike (separate processes on a shared machine measure the neighbours)."""
    import tensorflow as tf

    small, large = args.pair
    steps = {k: tf.function(_build(k, False, args).train_step, jit_compile=False) for k in (small, large)}
    data = {k: _batches(k, args.warmup + args.steps, args) for k in (small, large)}
    times: dict[int, list[float]] = {small: [], large: []}
    for k in (small, large):
        _timed(steps[k], data[k][: args.warmup])
    for _ in range(args.rounds):
        for k in (small, large):
            times[k] += _timed(steps[k], data[k][args.warmup :])
    medians = {k: statistics.median(t) for k, t in times.items()}
    return {
        "classes": [small, large],
        "median_step_s": [medians[small], medians[large]],
        "steps_each": len(times[small]),
        "ratio": medians[large] / medians[small],
    }


def _subprocess(args: argparse.Namespace, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        __file__,
        f"--sample-rate={args.sample_rate}",
        f"--backbone={args.backbone}",
        f"--feature-dim={args.feature_dim}",
        f"--batch-size={args.batch_size}",
        f"--warmup={args.warmup}",
        f"--steps={args.steps}",
        f"--rounds={args.rounds}",
        f"--seed={args.seed}",
        *(["--head-only"] if args.head_only else []),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((s for s in proc.stdout.splitlines() if s.startswith("RESULT")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{' '.join(extra)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT"))


def _shard_worker(args: argparse.Namespace) -> dict:
    """One worker of the --shard-memory comparison (TF_CONFIG in the environment when workers > 1)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from training.distributed import make_strategy, resolve_tf_config
    from training.partial_fc import build_partial_fc
    from training.sharded_fc import ShardedPartialFCModel, build_sharded_partial_fc

    strategy = make_strategy("auto", resolve_tf_config())
    k, dim = args.shard_classes, args.feature_dim
    rss_start = _rss_mb()
    keras.utils.set_random_seed(args.seed)
    with strategy.scope():
        inputs = keras.Input((dim,), name="input")
        backbone = keras.Model(inputs, keras.layers.Dense(dim, name="embedding")(inputs))
        build = build_sharded_partial_fc if args.sharded else build_partial_fc
        model = build(
            backbone,
            k,
            head="arcface",
            head_params={},
            sample_rate=args.sample_rate,
            seed=args.seed,
            optimizer="adam",
            center_lambda=0.01,
            alpha=0.5,
            rule="paper",
            center_lr=0.5,
        )
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        model.optimizer.build(model.trainable_variables)
    if isinstance(model, ShardedPartialFCModel):
        head_bytes = model.shard_bytes()
    else:  # every worker holds the full [K, D] weights, their 2 slots and the centers
        head_bytes = sum(
            int(np.prod(v.shape)) * 4 for v in (model.head.kernel, *model.head.slots, model.centers)
        )
    rss_built = _rss_mb()
    rng = np.random.default_rng(args.seed)
    n = args.batch_size * (args.warmup + args.steps)
    data = tf.data.Dataset.from_tensor_slices(
        (rng.random((n, dim), dtype=np.float32), rng.integers(0, k, n).astype(np.int32))
    ).batch(args.batch_size)
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])
            times.append(time.perf_counter() - self.t0)

    model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[Timer()])
    return {
        "workers": strategy.num_replicas_in_sync,
        "head": "sharded" if args.sharded else "replicated",
        "classes": k,
        "feature_dim": dim,
        "head_state_mb": head_bytes / 2**20,
        "rss_start_mb": rss_start,
        "rss_built_mb": rss_built,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "median_step_s": statistics.median(times[args.warmup :]),
    }


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def run_shard_memory(args: argparse.Namespace) -> list[dict]:
    """1 and 2 worker processes, replicated vs sharded head: what each worker stores and uses."""
    common = [
        f"--shard-classes={args.shard_classes}",
        f"--sample-rate={args.sample_rate}",
        f"--feature-dim={args.feature_dim}",
        f"--batch-size={args.batch_size}",
        f"--warmup={args.warmup}",
        f"--steps={args.steps}",
        f"--seed={args.seed}",
        "--shard-worker",
    ]
    base_env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    base_env["PYTHONPATH"] = str(ROOT)
    rows = []
    for workers in args.workers:
        for sharded in (False, True):
            addresses = [f"127.0.0.1:{p}" for p in _free_ports(workers)]
            procs = []
            for index in range(workers):
                env = dict(base_env)
                if workers > 1:
                    cluster = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
                    env["TF_CONFIG"] = json.dumps(cluster)
                cmd = [sys.executable, __file__, *common, *(["--sharded"] if sharded else [])]
                procs.append(
                    subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                )
            for index, proc in enumerate(procs):
                out, err = proc.communicate(timeout=900)
                line = next((s for s in out.splitlines() if s.startswith("RESULT")), None)
                if proc.returncode != 0 or line is None:
                    raise SystemExit(
                        f"worker {index} of {workers} failed (exit {proc.returncode}):\n{err[-3000:]}"
                    )
                row = json.loads(line.removeprefix("RESULT"))
                row["worker"] = index
                rows.append(row)
                print(
                    f"  {row['head']:<10} {workers} worker(s), worker {index}: head state "
                    f"{row['head_state_mb']:.0f} MB, peak RSS {row['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", nargs="+", type=int, default=[1000, 100_000, 1_000_000])
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--backbone", default="mobilefacenet")
    parser.add_argument("--feature-dim", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--head-only", action="store_true", help="a Dense layer instead of the backbone: the head's own cost"
    )
    parser.add_argument("--full-head", action="store_true", help="also time the dense head (<= 100k classes)")
    parser.add_argument("--quick", action="store_true", help="128-d, batch 16, 4 timed steps")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pair", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved blocks of the 1k-vs-100k ratio")
    parser.add_argument(
        "--shard-memory",
        action="store_true",
        help="head state per worker: 1 vs 2 workers, replicated vs sharded",
    )
    parser.add_argument("--shard-classes", type=int, default=100_000, help="classes of --shard-memory")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="worker counts of --shard-memory"
    )
    parser.add_argument("--shard-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.feature_dim, args.batch_size, args.steps, args.warmup, args.rounds = 128, 16, 4, 2, 3
        if args.head_only:  # cheap steps: a realistic batch and more of them
            args.batch_size, args.steps, args.warmup = 64, 20, 3
    if args.shard_worker:
        print("RESULT" + json.dumps(_shard_worker(args)))
        return
    if args.shard_memory:
        _report_shard_memory(args)
        return
    if args.one is not None:
        print("RESULT" + json.dumps(run_one(args)))
        return
    if args.pair is not None:
        print("RESULT" + json.dumps(run_pair(args)))
        return

    jobs = [(k, False) for k in args.classes]
    if args.full_head:
        jobs += [(k, True) for k in args.classes if k <= 100_000]
    rows = []
    for k, dense in jobs:
        rows.append(_subprocess(args, [f"--one={k}"] + (["--dense"] if dense else [])))
        r = rows[-1]
        print(f"  {r['head']} {k}: {r['median_step_s'] * 1e3:.0f} ms/step", flush=True)

    base = next(r for r in rows if r["classes"] == min(args.classes) and r["head"] != "full")
    print(f"\n{'head':<16}{'classes':>10}{'ms/step':>9}{'x 1k':>7}{'vars MB':>9}{'peak RSS MB':>13}")
    for r in rows:
        r["ratio_to_smallest"] = r["median_step_s"] / base["median_step_s"]
        print(
            f"{r['head']:<16}{r['classes']:>10}{r['median_step_s'] * 1e3:>9.0f}{r['ratio_to_smallest']:>7.2f}"
            f"{r['variable_mb']:>9.0f}{r['peak_rss_mb']:>13.0f}"
        )
    pair = None
    if 1000 in args.classes and 100_000 in args.classes:
        pair = _subprocess(args, ["--pair", "1000", "100000"])
        a, b = pair["median_step_s"]
        print(
            f"interleaved in one process ({pair['steps_each']} steps each): 1k {a * 1e3:.0f} ms, "
            f"100k {b * 1e3:.0f} ms, ratio {pair['ratio']:.2f}x (target <= 1.5x)"
        )
    import tensorflow as tf

    results = RESULTS_DIR / ("partial_fc_head_only.json" if args.head_only else "partial_fc.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {k: v for k, v in vars(args).items() if k not in ("one", "dense", "pair")},
        "rows": rows,
        "interleaved_1k_vs_100k": pair,
        "target": {"classes": 100_000, "max_ratio": 1.5},
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "tensorflow": tf.__version__},
    }
    results.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {results}")


def _report_shard_memory(args: argparse.Namespace) -> None:
    import tensorflow as tf

    started = time.monotonic()
    rows = run_shard_memory(args)
    print(
        f"\n{args.shard_classes} classes, {args.feature_dim}-d, {args.sample_rate:g} sampled, batch "
        f"{args.batch_size} (per worker: head state = weights + 2 Adam slots + centers)"
    )
    print(
        f"{'head':<12}{'workers':>8}{'worker':>7}{'head MB':>9}{'RSS built MB':>14}{'peak RSS MB':>13}"
        f"{'ms/step':>9}"
    )
    for r in rows:
        print(
            f"{r['head']:<12}{r['workers']:>8}{r['worker']:>7}{r['head_state_mb']:>9.0f}{r['rss_built_mb']:>14.0f}"
            f"{r['peak_rss_mb']:>13.0f}{r['median_step_s'] * 1e3:>9.0f}"
        )
    seconds = time.monotonic() - started
    print(f"({seconds:.0f} s)")
    results = RESULTS_DIR / "partial_fc_shards.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {
            k: getattr(args, k)
            for k in (
                "shard_classes",
                "feature_dim",
                "sample_rate",
                "batch_size",
                "steps",
                "warmup",
                "workers",
            )
        },
        "rows": rows,
        "seconds": seconds,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "tensorflow": tf.__version__},
    }
    results.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
