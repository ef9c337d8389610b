"""Dynamic micro-batching: concurrent embed requests are grouped into one onnxruntime call.

Each request puts its images (one float32 block) and a future on a bounded queue. Whenever an inference
thread is idle and requests wait, the event loop takes whatever is queued (up to `max_batch_size` images,
with several threads no more than one thread's share of the queued and running images, optionally waiting
`batch_wait_ms` for more) and hands it to that thread, which runs the model and gives each
request exactly its own rows of the result, by position. There is no batcher task to wake: a batch is started
at the end of the loop iteration in which a request arrives (so requests read in the same iteration share
it) and, under load, the moment a batch finishes: the inference thread that ran it takes the next one itself
(under the engine's lock) before handing the results to the loop in one `call_soon_threadsafe` callback, so
it never waits for a loop that is busy reading other requests (a `run_in_executor` future chain cost two more
loop wake-ups per batch).

With `batch_wait_ms = 0` a lone request is run at once; under load, requests that arrive while a batch runs
form the next batch, so batching grows with load without adding latency at low load (the infinity design).
Batches predicted to be very cheap (`inline_max_ms`) run on the event loop itself, where a thread hand-off
would cost more than the inference.

`workers` batches may run at the same time, each in its own thread (Triton's "instance count"). With one
onnxruntime intra-op thread per call this replaces parallelism inside a call by parallelism across calls,
which keeps every core busy on a small host where the event loop competes with onnxruntime's threads: a
parallel section waits for its slowest thread, so one descheduled intra-op thread stalls the whole call.
Such a call is slower alone, though (2.4 ms instead of 1.6 ms for one 112x112 RGB image on 2 cores), so a
`lone_run` (a session using every core) takes each batch that starts while no other batch runs or waits and
requests do not arrive faster than batches run (under a closed loop the other clients' requests are still in
the sockets, unseen).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.core.inflight import IN_FLIGHT
from service.errors import NotReadyError, OverloadedError

logger = logging.getLogger("idembed.engine")

# A batch that starts alone goes to the all-cores session while that is measured no slower per image than a
# worker's session; every this-many lone batches the other one is tried, so the choice follows the host.
_EXPLORE_EVERY = 20

BatchObserver = Callable[[int, float], None]


class EngineClosedError(NotReadyError):
    """The engine is draining (shutdown or replaced by a hot reload) and takes no new work."""


@dataclass(slots=True)
class _Request:
    inputs: np.ndarray
    future: asyncio.Future[np.ndarray]
    queued_at: float

    @property
    def rows(self) -> int:
        return len(self.inputs)


@dataclass(slots=True)
class _Job:
    """One batch handed to an inference thread."""

    batch: list[_Request]
    inputs: np.ndarray
    run: Callable[[np.ndarray], np.ndarray]
    dispatched_at: float
    alone: str | None  # for a batch that started alone: "lone" or "worker", the session it runs on
    run_s: float = 0.0


def _batch_inputs(batch: list[_Request]) -> np.ndarray:
    """The one model input of a batch: its requests' rows in order (ValueError if their shapes differ)."""
    return batch[0].inputs if len(batch) == 1 else np.concatenate([r.inputs for r in batch])


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
        lone_inline_max_ms: float = 0.0,
    ) -> None:
        if max_batch_size < 1 or max_queue_depth < 1 or batch_wait_ms < 0 or workers < 1:
            raise ValueError("max_batch_size, max_queue_depth, workers must be >= 1 and batch_wait_ms >= 0")
        if inline_max_ms < 0 or lone_inline_max_ms < 0:
            raise ValueError("inline_max_ms and lone_inline_max_ms must be >= 0")
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
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # One thread per concurrent batch. With the default single worker, onnxruntime parallelises inside a
        # call; several workers suit single-threaded calls (`ort_intra_op_threads=1`), see the module doc.
        self.workers = workers
        self._idle_workers = workers
        self._running = 0  # batches handed to an inference thread and not finished yet
        self._running_rows = 0  # their images
        # The queue (`_pending`, `_pending_rows`) and `_running_rows` are shared with the inference threads,
        # which take their next batch themselves (see _serve_jobs): they change under this lock. Everything
        # else, `_idle_workers` and `_running` included, changes on the event loop only.
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._dispatch_scheduled = False
        self._window: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        self._last_batch_s = 0.001
        # Batches predicted to take less than this run on the event loop itself: handing a 50 us inference
        # to a thread costs a wake-up and a GIL hand-back that can exceed the inference (profiled).
        self.inline_max_s = inline_max_ms / 1000.0
        # A batch that starts alone (nothing running or queued) and is predicted to take less than this runs
        # on the event loop too: nothing else needs the loop then, and it saves both thread wake-ups (the
        # hand-off to the thread and the result back), each tens of microseconds on an idle host and up to
        # milliseconds on a busy one. Requests arriving meanwhile wait in the socket until it is done.
        self.lone_inline_max_s = lone_inline_max_ms / 1000.0
        self._per_row_s: float | None = None
        # Time between the last two requests' arrivals, and the model time of the last batch: when requests
        # arrive faster than batches run, a batch is not alone, whatever the counters say (see _dispatch).
        self._last_arrival = -math.inf
        self._arrival_gap_s = math.inf
        self._last_run_s = 0.0
        # Model time per image of batches that started alone, by session ("lone", "worker"); see _alone_run.
        self._alone_row_s: dict[str, float] = {}
        self._alone_batches = 0
        self._exploring = False  # the lone batch in flight tries the session not preferred

    @property
    def queue_depth(self) -> int:
        """Images waiting for inference (not counting the batches being run)."""
        return self._pending_rows

    @property
    def closing(self) -> bool:
        return self._closing

    def start(self) -> None:
        """Bind to the running event loop and start the inference threads."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for i in range(self.workers):
            # Daemon: a thread blocked in a stuck model call must not keep the process alive after stop().
            thread = threading.Thread(target=self._serve_jobs, name=f"idembed-infer_{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    async def embed(self, inputs: np.ndarray) -> np.ndarray:
        """Embeddings for `inputs` [n, ...]; raises `OverloadedError` when the queue is full."""
        loop = self._loop
        if self._closing or loop is None:
            raise EngineClosedError("inference engine takes no work now (starting, reloading or stopping)")
        n = len(inputs)
        if n == 0:
            raise ValueError("empty batch")
        if self._pending_rows + n > self.max_queue_depth:
            raise OverloadedError(
                f"inference queue is full ({self._pending_rows} images queued, limit {self.max_queue_depth})",
                retry_after_s=self._retry_after(),
            )
        future: asyncio.Future[np.ndarray] = loop.create_future()
        now = time.perf_counter()
        self._arrival_gap_s, self._last_arrival = now - self._last_arrival, now
        with self._lock:
            self._pending.append(_Request(inputs, future, now))
            self._pending_rows += n
        if not self._dispatch_scheduled:
            # At the end of this loop iteration, not now: requests made ready by the same network read
            # (several connections at once) join this one's batch.
            self._dispatch_scheduled = True
            loop.call_soon(self._dispatch)
        return await future

    def _retry_after(self) -> int:
        batches_ahead = math.ceil(self._pending_rows / self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._last_batch_s))

    def _batch_limit(self) -> int:
        """Most images the next batch takes: `max_batch_size`, and with several workers no more than its
        share of the work in the engine (queued and running images over the workers). Taking everything
        queued left the next worker to finish with nothing while one long batch ran: a burst of 32 requests
        on two idle workers ran as one batch of 32 on one core, and now runs as two of 16."""
        if self.workers == 1:
            return self.max_batch_size
        share = math.ceil((self._pending_rows + self._running_rows) / self.workers)
        return max(1, min(self.max_batch_size, share))

    def _take_batch(self) -> list[_Request]:
        taken: list[_Request] = []
        rows = 0
        limit = self._batch_limit()
        while self._pending:
            head = self._pending[0]
            # A request larger than the limit runs alone rather than being split across calls.
            if taken and rows + head.rows > limit:
                break
            self._pending.popleft()
            self._pending_rows -= head.rows
            if head.future.done():  # the client went away (request task cancelled): skip its work
                continue
            taken.append(head)
            rows += head.rows
        return taken

    def _hold_for_window(self) -> bool:
        """With `batch_wait_ms`: whether to wait for more requests (a timer dispatches at the deadline)."""
        if self.batch_wait_s <= 0 or self._closing or self._pending_rows >= self.max_batch_size:
            return False
        if self._window is not None:
            return True
        remaining = self._pending[0].queued_at + self.batch_wait_s - time.perf_counter()
        if remaining <= 0:
            return False
        assert self._loop is not None
        self._window = self._loop.call_later(remaining, self._window_closed)
        return True

    def _window_closed(self) -> None:
        self._window = None
        self._dispatch()

    def _dispatch(self) -> None:
        """Start batches while an inference thread is idle and requests wait: runs on the event loop, when
        requests arrive and the moment a batch finishes, so no core idles while work is queued."""
        self._dispatch_scheduled = False
        while self._pending and self._idle_workers > 0:
            if self._hold_for_window():
                return
            if self._window is not None:
                self._window.cancel()
                self._window = None
            with self._lock:
                batch = self._take_batch()
            if not batch:
                continue
            try:
                inputs = _batch_inputs(batch)
            except ValueError as exc:  # requests of different shapes: fail them, never leave them waiting
                self._fail(batch, exc)
                continue
            predicted = None if self._per_row_s is None else self._per_row_s * len(inputs)
            # Alone: nothing running or queued, and no other HTTP request in the server (one still being read
            # or decoded would arrive mid-call: the first of a burst must not take every core or the loop).
            # Nor under load, where requests arrive more than twice as fast as the last batch ran (a
            # sequential client's requests are at least one run apart: it waits for each answer): the
            # others are still in the sockets, which no counter sees. Run on the loop, such batches held
            # every arrival back (int8 facecnn at concurrency 32: the loop at 1.0 core, the inference
            # threads idle, 1,080 img/s; 1,152 without the lone inline runs).
            alone = (
                self._running == 0
                and not self._pending
                and IN_FLIGHT.count <= len(batch)
                and self._last_run_s <= 2.0 * self._arrival_gap_s
            )
            kind = self._alone_run() if alone and self._lone_run is not None else None
            run = self._lone_run if kind == "lone" and self._lone_run is not None else self._run
            if predicted is not None and (
                predicted <= self.inline_max_s or (alone and predicted <= self.lone_inline_max_s)
            ):
                self._run_inline(batch, inputs, run, kind)
                continue
            self._idle_workers -= 1
            self._running += 1
            with self._lock:
                self._running_rows += len(inputs)
            self._jobs.put(_Job(batch, inputs, run, time.perf_counter(), kind))
        self._check_drained()

    def _alone_run(self) -> str:
        """The session for a batch that starts alone: "lone" (every core) unless it has been measured slower
        per image than a worker's share of the cores, as on a busy host, where the other processes
        deschedule one of its threads mid-call and the whole call waits for it (measured: 2 threads spinning
        5-12 ms for a 112x112 image that 1 thread does in 2.5 ms). Every `_EXPLORE_EVERY`-th lone batch
        tries the other session, so the choice follows the host's load."""
        self._alone_batches += 1
        lone, worker = self._alone_row_s.get("lone"), self._alone_row_s.get("worker")
        prefer_lone = worker is None or lone is None or lone <= worker
        self._exploring = self._alone_batches % _EXPLORE_EVERY == 0
        return "lone" if prefer_lone != self._exploring else "worker"

    def _run_inline(
        self,
        batch: list[_Request],
        inputs: np.ndarray,
        run: Callable[[np.ndarray], np.ndarray],
        alone: str | None,
    ) -> None:
        start = time.perf_counter()
        try:
            outputs = run(inputs)
        except Exception as exc:
            self._fail(batch, exc)
            return
        elapsed = time.perf_counter() - start
        self._finish(batch, outputs, elapsed, elapsed, alone)

    def _serve_jobs(self) -> None:
        """An inference thread: run each job, take the next batch from the queue if requests wait, hand the
        results to the event loop in one callback, run the next batch or wait for the loop to send one.

        Waiting for the loop to dispatch cost a worker ~2.4 ms per ~10 ms batch under load (int8 facecnn,
        concurrency 32, engine trace: 1.35 ms until the busy loop ran the result callback, 1.0 ms until the
        woken thread held the GIL); taking the next batch itself is +5.5% (int8) and +4.9% (fp32) on
        facecnn at one image per request, paired (docs/performance.md#int8-models)."""
        loop = self._loop
        assert loop is not None
        job = self._jobs.get()
        while job is not None:
            start = time.perf_counter()
            try:
                outputs, error = job.run(job.inputs), None
            except Exception as exc:
                outputs, error = None, exc
            job.run_s = time.perf_counter() - start
            batch = self._take_next(job)
            try:
                loop.call_soon_threadsafe(self._job_done, job, outputs, error, batch is not None)
            except RuntimeError:  # the event loop is closed: nobody waits for this batch any more
                return
            job = None if batch is None else self._next_job(batch)
            if job is None:
                job = self._jobs.get()

    def _take_next(self, finished: _Job) -> list[_Request] | None:
        """In an inference thread: the finished batch's images leave the engine's count, and the thread takes
        its next batch (its share, as the loop would) when requests wait and no batch window is open."""
        with self._lock:
            self._running_rows -= len(finished.inputs)
            if not self._pending or self.batch_wait_s > 0:
                return None
            batch = self._take_batch()
            if not batch:
                return None
            self._running_rows += sum(r.rows for r in batch)
            return batch

    def _next_job(self, batch: list[_Request]) -> _Job | None:
        """In an inference thread: the job for a batch it took; None for requests of different shapes, which
        cannot be one call: they fail on the loop, which counts the thread idle again."""
        try:
            inputs = _batch_inputs(batch)
        except ValueError as exc:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._abandon, batch, exc)
            return None
        return _Job(batch, inputs, self._run, time.perf_counter(), None)

    def _abandon(self, batch: list[_Request], exc: Exception) -> None:
        """On the loop: a batch an inference thread took cannot run; fail it and count the thread idle."""
        self._idle_workers += 1
        self._running -= 1
        with self._lock:
            self._running_rows -= sum(r.rows for r in batch)
        self._fail(batch, exc)
        self._dispatch()

    def _job_done(
        self, job: _Job, outputs: np.ndarray | None, error: Exception | None, continued: bool = False
    ) -> None:
        """On the loop: deliver a finished batch; `continued` when its thread already runs its next batch."""
        if not continued:
            self._idle_workers += 1
            self._running -= 1
        if error is not None or outputs is None:
            self._fail(job.batch, error or RuntimeError("the model returned no output"))
        else:
            self._finish(job.batch, outputs, job.run_s, time.perf_counter() - job.dispatched_at, job.alone)
        # The next batch goes to the thread before the finished requests' responses are written.
        self._dispatch()

    def _check_drained(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done() and not self._pending and self._running == 0:
            drained.set_result(None)

    @staticmethod
    def _fail(batch: list[_Request], exc: Exception) -> None:
        rows = sum(r.rows for r in batch)
        logger.error("inference failed for a batch of %d images", rows, exc_info=exc)
        for request in batch:
            if not request.future.done():
                request.future.set_exception(exc)

    def _finish(
        self,
        batch: list[_Request],
        outputs: np.ndarray,
        run_s: float,
        elapsed: float,
        alone: str | None = None,
    ) -> None:
        self._last_batch_s = elapsed
        self._last_run_s = run_s
        rows = sum(r.rows for r in batch)
        # The inline decision uses the model's own time (`run_s`), not `elapsed`: that includes the hand-off
        # to the inference thread (a wake-up and a GIL hand-back, often more than a tiny model's inference on
        # a busy host), which would keep cheap batches on the thread once they had been sent there.
        per_row = run_s / rows
        # Exponential average: one slow batch (a page fault, a noisy neighbour) does not flip the mode.
        self._per_row_s = per_row if self._per_row_s is None else 0.8 * self._per_row_s + 0.2 * per_row
        if alone is not None:
            # The session not preferred is timed once per `_EXPLORE_EVERY` lone batches, so its figure is old:
            # the fresh one replaces it, and a host that has gone quiet (or busy) flips the choice at once.
            seen = None if self._exploring else self._alone_row_s.get(alone)
            self._alone_row_s[alone] = per_row if seen is None else 0.8 * seen + 0.2 * per_row
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
        loop = self._loop
        if loop is None:
            return
        self._dispatch()  # an open batch window closes now
        if self._pending or self._running:
            self._drained = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), timeout_s)
            except TimeoutError:
                logger.warning("engine did not drain within %.1f s; cancelling pending requests", timeout_s)
                with self._lock:
                    abandoned = list(self._pending)
                    self._pending.clear()
                    self._pending_rows = 0
                for request in abandoned:
                    if not request.future.done():
                        request.future.set_exception(EngineClosedError("the inference engine stopped"))
        for _ in self._threads:
            self._jobs.put(None)
        # Idle threads exit at once; one still inside a model call (after a timeout) ends with that call.
        for thread in self._threads:
            thread.join(timeout=0.1 if self._running else 5.0)
        self._threads.clear()
