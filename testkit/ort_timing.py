"""onnxruntime timing loops on ready tensors: the raw-model ceilings the benchmarks compare the service with.

`run` is any callable taking one batch (an `EmbeddingModel.run_raw`, a bound `session.run` wrapper), so
the same loop times every session configuration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

Run = Callable[[np.ndarray], object]


def split_batch(batch: np.ndarray, callers: int) -> list[np.ndarray]:
    """`batch` in at most `callers` nearly equal contiguous parts (never an empty one)."""
    return [np.ascontiguousarray(p) for p in np.array_split(batch, min(callers, len(batch)))]


def call_times(
    run: Run, batch: np.ndarray, seconds: float, callers: int = 1
) -> tuple[list[float], int, float]:
    """Seconds of every `run` made back to back for `seconds` by up to `callers` threads, each on its share
    of `batch` (so as many images are in flight as in one call on all of it); images done; time taken."""
    parts = split_batch(batch, callers)
    # Up to 5 warm-up calls, fewer when calls are long (IResNet-50 on a batch of 32 takes seconds).
    warm = time.perf_counter()
    for _ in range(5):
        run(parts[0])
        if time.perf_counter() - warm > seconds / 2:
            break
    times: list[list[float]] = [[] for _ in parts]
    start = time.perf_counter()

    def loop(part: np.ndarray, mine: list[float]) -> None:
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            run(part)
            mine.append(time.perf_counter() - t)

    threads = [threading.Thread(target=loop, args=pt) for pt in zip(parts, times, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    images = sum(len(t) * len(part) for t, part in zip(times, parts, strict=True))
    return [x for t in times for x in t], images, time.perf_counter() - start


def throughput(run: Run, batch: np.ndarray, seconds: float, callers: int = 1) -> float:
    """Images/s of back-to-back `run` calls on `batch`, split among `callers` threads."""
    _, images, elapsed = call_times(run, batch, seconds, callers)
    return images / elapsed


def sequential_latency(run: Run, one: np.ndarray, n: int, warmup: int = 20) -> list[float]:
    """Seconds of each of `n` sequential `run` calls on `one` (after `warmup` untimed calls)."""
    for _ in range(warmup):
        run(one)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        run(one)
        times.append(time.perf_counter() - t)
    return times
