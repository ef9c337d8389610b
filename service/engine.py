"""Dynamic micro-batching: concurrent embed requests are grouped into one onnxruntime call.

Each request puts its images (one float32 block) and a future on a bounded queue. A single worker coroutine
takes whatever is queued (up to `max_batch_size` images, optionally waiting `batch_wait_ms` for more), runs
the model in a dedicated thread, and hands each request exactly its own rows of the result, by position.

With `batch_wait_ms = 0` a lone request is run at once; under load, requests that arrive while a batch runs
form the next batch, so batching grows with load without adding latency at low load (the infinity design).
Batches predicted to be very cheap (`inline_max_ms`) run on the event loop itself, where a thread hand-off
would cost more than the inference.

`workers` batches may run at the same time, each in its own thread (Triton's "instance count"). With one
onnxruntime intra-op thread per call this replaces parallelism inside a call by parallelism across calls,
which keeps every core busy on a small host where the event loop competes with onnxruntime's threads: a
parallel section waits for its slowest thread, so one descheduled intra-op thread stalls the whole call.
Such a call is slower alone, though (2.4 ms instead of 1.6 ms for one 112x112 RGB image on 2 cores), so a
`lone_run` (a session using every core) takes each batch that starts while no other batch runs or waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.errors import NotReadyError, OverloadedError

logger = logging.getLogger("idembed.engine")

BatchObserver = Callable[[int, float], None]


class EngineClosedError(NotReadyError):
    """The engine is draining (shutdown or replaced by a hot reload) and takes no new work."""


@dataclass
class _Request:
    inputs: np.ndarray
    future: asyncio.Future[np.ndarray]

    @property
    def rows(self) -> int:
        return len(self.inputs)


class BatchingEngine:
    """Queue + worker around a `run(batch) -> embeddings` callable (an `EmbeddingModel.run`)."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int = 64,
        batch_wait_ms: float = 0.0,
        max_queue_depth: int = 1024,
        observer: BatchObserver | None = None,
        inline_max_ms: float = 0.0,
        workers: int = 1,
        lone_run: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_depth < 1 or batch_wait_ms < 0 or workers < 1:
            raise ValueError("max_batch_size, max_queue_depth, workers must be >= 1 and batch_wait_ms >= 0")
        self._run = run
        # For a batch that starts while nothing else runs or waits: all cores are idle, so one call that uses
        # them all finishes sooner than `run`'s share of them (several workers, see the module doc).
        self._lone_run = lone_run
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.max_queue_depth = max_queue_depth
        self._observer = observer
        self._pending: deque[_Request] = deque()
        self._pending_rows = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        # One thread per concurrent batch. With the default single worker, onnxruntime parallelises inside a
        # call; several workers suit single-threaded calls (`ort_intra_op_threads=1`), see the module doc.
        self.workers = workers
        self._slots = asyncio.Semaphore(workers)
        self._running: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="idembed-infer")
        self._last_batch_s = 0.001
        # Batches predicted to take less than this run on the event loop itself: handing a 50 us inference
        # to a thread costs a wake-up and a GIL hand-back that can exceed the inference (profiled).
        self.inline_max_s = inline_max_ms / 1000.0
        self._per_row_s: float | None = None

    @property
    def queue_depth(self) -> int:
        """Images waiting for inference (not counting the batch being run)."""
        return self._pending_rows

    @property
    def closing(self) -> bool:
        return self._closing

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="idembed-batcher")

    async def embed(self, inputs: np.ndarray) -> np.ndarray:
        """Embeddings for `inputs` [n, ...]; raises `OverloadedError` when the queue is full."""
        if self._closing or self._worker is None:
            raise EngineClosedError("inference engine takes no work now (starting, reloading or stopping)")
        n = len(inputs)
        if n == 0:
            raise ValueError("empty batch")
        if self._pending_rows + n > self.max_queue_depth:
            raise OverloadedError(
                f"inference queue is full ({self._pending_rows} images queued, limit {self.max_queue_depth})",
                retry_after_s=self._retry_after(),
            )
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(inputs, future))
        self._pending_rows += n
        self._wakeup.set()
        return await future

    def _retry_after(self) -> int:
        batches_ahead = math.ceil(self._pending_rows / self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._last_batch_s))

    async def _wait_for_more(self) -> None:
        deadline = time.perf_counter() + self.batch_wait_s
        while self._pending_rows < self.max_batch_size and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _take_batch(self) -> list[_Request]:
        taken: list[_Request] = []
        rows = 0
        while self._pending:
            head = self._pending[0]
            # A request larger than max_batch_size runs alone rather than being split across calls.
            if taken and rows + head.rows > self.max_batch_size:
                break
            self._pending.popleft()
            self._pending_rows -= head.rows
            if head.future.done():  # the client went away (request task cancelled): skip its work
                continue
            taken.append(head)
            rows += head.rows
        return taken

    def _timed_run(
        self, inputs: np.ndarray, run: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> tuple[np.ndarray, float]:
        """The model's outputs and its own run time, timed in whichever thread runs it."""
        start = time.perf_counter()
        outputs = (run or self._run)(inputs)
        return outputs, time.perf_counter() - start

    async def _work(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    if self._running:
                        await asyncio.wait(set(self._running))
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.batch_wait_s > 0:
                await self._wait_for_more()
            # Take the batch only once a worker is free: requests arriving meanwhile join it.
            await self._slots.acquire()
            batch = self._take_batch()
            if not batch:
                self._slots.release()
                continue
            inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([r.inputs for r in batch])
            inline = self._per_row_s is not None and self._per_row_s * len(inputs) <= self.inline_max_s
            if inline:
                try:
                    start = time.perf_counter()
                    try:
                        outputs, run_s = self._timed_run(inputs)
                    except Exception as exc:
                        self._fail(batch, exc)
                        continue
                    self._finish(batch, outputs, run_s, time.perf_counter() - start)
                finally:
                    self._slots.release()
            else:
                lone = self._lone_run is not None and not self._running and not self._pending
                run = self._lone_run if lone else None
                task = asyncio.get_running_loop().create_task(self._run_in_thread(batch, inputs, run))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _run_in_thread(
        self, batch: list[_Request], inputs: np.ndarray, run: Callable[[np.ndarray], np.ndarray] | None
    ) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            outputs, run_s = await loop.run_in_executor(self._executor, self._timed_run, inputs, run)
        except Exception as exc:
            self._fail(batch, exc)
        else:
            self._finish(batch, outputs, run_s, time.perf_counter() - start)
        finally:
            self._slots.release()

    @staticmethod
    def _fail(batch: list[_Request], exc: Exception) -> None:
        rows = sum(r.rows for r in batch)
        logger.error("inference failed for a batch of %d images", rows, exc_info=exc)
        for request in batch:
            if not request.future.done():
                request.future.set_exception(exc)

    def _finish(self, batch: list[_Request], outputs: np.ndarray, run_s: float, elapsed: float) -> None:
        self._last_batch_s = elapsed
        rows = sum(r.rows for r in batch)
        # The inline decision uses the model's own time (`run_s`), not `elapsed`: that includes the hand-off
        # to the inference thread (a wake-up and a GIL hand-back, often more than a tiny model's inference on
        # a busy host), which would keep cheap batches on the thread once they had been sent there.
        per_row = run_s / rows
        # Exponential average: one slow batch (a page fault, a noisy neighbour) does not flip the mode.
        self._per_row_s = per_row if self._per_row_s is None else 0.8 * self._per_row_s + 0.2 * per_row
        if self._observer is not None:
            self._observer(rows, elapsed)
        offset = 0
        for request in batch:
            # Rows are handed out by position in the concatenation: request i gets exactly its own rows.
            if not request.future.done():
                request.future.set_result(outputs[offset : offset + request.rows])
            offset += request.rows

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop taking work, finish every queued and running batch (up to `timeout_s`), then shut down."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout_s)
            except TimeoutError:
                logger.warning("engine did not drain within %.1f s; cancelling pending requests", timeout_s)
                self._worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._worker
                for request in self._pending:
                    if not request.future.done():
                        request.future.set_exception(EngineClosedError("the inference engine stopped"))
                self._pending.clear()
                self._pending_rows = 0
        self._executor.shutdown(wait=True)
