"""Micro-batcher: groups concurrent requests, never mixes results, bounds its queue, drains on stop."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.engine import BatchingEngine, EngineClosedError
from service.errors import OverloadedError


class RecordingModel:
    """Doubles each row (so mixed-up results would show) and records the size of every batch."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batch_sizes: list[int] = []
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.gate.wait()
        time.sleep(self.delay_s)
        self.batch_sizes.append(len(batch))
        return batch.reshape(len(batch), -1) * 2.0


def _recorder(threads: list[tuple[str, str]], kind: str, delay_s: float):
    """A model run that records (kind, the name of the thread it ran on), sleeps and doubles the batch."""

    def run(batch: np.ndarray) -> np.ndarray:
        threads.append((kind, threading.current_thread().name))
        time.sleep(delay_s)
        return batch * 2.0

    return run


@pytest.mark.asyncio
async def test_concurrent_distinct_requests_each_get_their_own_rows() -> None:
    model = RecordingModel(delay_s=0.002)
    engine = BatchingEngine(model, max_batch_size=16, max_queue_depth=1000)
    engine.start()
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(int(rng.integers(1, 4)), 3)).astype(np.float32) for _ in range(200)]
    outputs = await asyncio.gather(*(engine.embed(x) for x in inputs))
    await engine.stop()
    for x, y in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(y, x * 2.0)
    assert max(model.batch_sizes) > 1, "concurrent requests should have been batched"
    assert max(model.batch_sizes) <= 16 or len(model.batch_sizes) == len(inputs)


@pytest.mark.asyncio
async def test_lone_request_runs_without_waiting_for_a_batch_window() -> None:
    engine = BatchingEngine(RecordingModel(), max_batch_size=64, batch_wait_ms=0.0)
    engine.start()
    start = time.perf_counter()
    await engine.embed(np.ones((1, 3), np.float32))
    assert time.perf_counter() - start < 0.5
    await engine.stop()


@pytest.mark.asyncio
async def test_batch_wait_gathers_requests_arriving_within_the_window() -> None:
    model = RecordingModel()
    engine = BatchingEngine(model, max_batch_size=64, batch_wait_ms=50.0)
    engine.start()

    async def late(i: int) -> np.ndarray:
        await asyncio.sleep(0.005 * i)
        return await engine.embed(np.full((1, 2), i, np.float32))

    await asyncio.gather(*(late(i) for i in range(4)))
    await engine.stop()
    assert model.batch_sizes == [4]


@pytest.mark.asyncio
async def test_full_queue_raises_overloaded_with_retry_after() -> None:
    model = RecordingModel()
    model.gate.clear()  # hold the first batch inside the model so the queue fills
    engine = BatchingEngine(model, max_batch_size=2, max_queue_depth=4)
    engine.start()
    first = asyncio.create_task(engine.embed(np.ones((2, 1), np.float32)))
    await asyncio.sleep(0.05)
    queued = [asyncio.create_task(engine.embed(np.ones((2, 1), np.float32))) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError) as info:
        await engine.embed(np.ones((1, 1), np.float32))
    assert info.value.retry_after_s >= 1
    model.gate.set()
    await asyncio.gather(first, *queued)
    await engine.stop()


@pytest.mark.asyncio
async def test_stop_finishes_queued_work_then_refuses_new_work() -> None:
    model = RecordingModel(delay_s=0.01)
    engine = BatchingEngine(model, max_batch_size=1)
    engine.start()
    tasks = [asyncio.create_task(engine.embed(np.full((1, 1), i, np.float32))) for i in range(5)]
    await asyncio.sleep(0)
    await engine.stop()
    assert [float(t.result()[0, 0]) for t in tasks] == [0.0, 2.0, 4.0, 6.0, 8.0]
    with pytest.raises(EngineClosedError):
        await engine.embed(np.ones((1, 1), np.float32))


@pytest.mark.asyncio
async def test_request_larger_than_max_batch_runs_alone_and_whole() -> None:
    model = RecordingModel()
    engine = BatchingEngine(model, max_batch_size=4, max_queue_depth=100)
    engine.start()
    out = await engine.embed(np.arange(10, dtype=np.float32).reshape(10, 1))
    await engine.stop()
    np.testing.assert_array_equal(out[:, 0], np.arange(10) * 2.0)
    assert model.batch_sizes == [10]


@pytest.mark.asyncio
async def test_model_failure_reaches_every_request_of_the_batch_and_engine_keeps_going() -> None:
    calls = {"n": 0}

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return batch

    engine = BatchingEngine(flaky, max_batch_size=8)
    engine.start()
    with pytest.raises(RuntimeError, match="boom"):
        await engine.embed(np.ones((1, 1), np.float32))
    ok = await engine.embed(np.ones((1, 1), np.float32))
    await engine.stop()
    assert ok.shape == (1, 1)


@pytest.mark.asyncio
async def test_inline_mode_runs_cheap_batches_on_the_event_loop_thread() -> None:
    threads: list[str] = []

    def model(batch: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return batch

    engine = BatchingEngine(model, max_batch_size=8, inline_max_ms=50.0)
    engine.start()
    for _ in range(3):
        await engine.embed(np.ones((1, 1), np.float32))
    await engine.stop()
    # The first batch has no timing yet and goes to the inference thread; later cheap ones run inline.
    assert threads[0].startswith("idembed-infer")
    assert threads[1:] == [threading.main_thread().name] * 2


class OverlapModel:
    """Records how many calls run at the same time; each call holds its thread for `delay_s`."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.active = 0
        self.most_active = 0
        self.threads: set[str] = set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        with self.lock:
            self.active -= 1
        return batch.reshape(len(batch), -1) * 2.0


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [1, 3])
async def test_workers_bound_the_batches_running_at_once_and_never_mix_rows(workers: int) -> None:
    model = OverlapModel(delay_s=0.02)
    engine = BatchingEngine(model, max_batch_size=4, max_queue_depth=1000, workers=workers)
    engine.start()
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=(int(rng.integers(1, 3)), 3)).astype(np.float32) for _ in range(60)]
    outputs = await asyncio.gather(*(engine.embed(x) for x in inputs))
    await engine.stop()
    for x, y in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(y, x * 2.0)
    assert model.most_active == workers
    assert len(model.threads) == workers


def _two_workers(delay_s: float) -> tuple[RecordingModel, BatchingEngine]:
    """A started engine with two workers on a recording model (call it from the running event loop)."""
    model = RecordingModel(delay_s=delay_s)
    engine = BatchingEngine(model, max_batch_size=32, workers=2)
    engine.start()
    return model, engine


def _row(value: int) -> np.ndarray:
    return np.full((1, 1), value, np.float32)


@pytest.mark.asyncio
async def test_a_burst_is_shared_among_the_idle_workers() -> None:
    # Taking everything queued ran a burst of 32 as one batch on one worker while the other sat idle.
    model, engine = _two_workers(0.02)
    outputs = await asyncio.gather(*(engine.embed(_row(i)) for i in range(32)))
    await engine.stop()
    assert sorted(model.batch_sizes) == [16, 16]
    assert [float(o[0, 0]) for o in outputs] == [2.0 * i for i in range(32)]


@pytest.mark.asyncio
async def test_a_batch_takes_no_more_than_its_share_of_the_queued_and_running_work() -> None:
    model, engine = _two_workers(0.05)
    first = asyncio.ensure_future(engine.embed(_row(0)))
    await asyncio.sleep(0.01)  # one batch of one runs on one worker; six requests arrive for the other
    outputs = await asyncio.gather(first, *(engine.embed(_row(i)) for i in range(1, 7)))
    await engine.stop()
    # 7 images in the engine over 2 workers: the idle one takes 4, the last 2 go to whichever is free first.
    assert sorted(model.batch_sizes) == [1, 2, 4]
    assert [float(o[0, 0]) for o in outputs] == [2.0 * i for i in range(7)]


@pytest.mark.asyncio
async def test_a_request_larger_than_its_share_still_runs_whole() -> None:
    model, engine = _two_workers(0.01)
    outputs = await asyncio.gather(engine.embed(np.ones((10, 1), np.float32)), engine.embed(_row(1)))
    await engine.stop()
    assert sorted(model.batch_sizes) == [1, 10]
    assert [len(o) for o in outputs] == [10, 1]


@pytest.mark.asyncio
async def test_stop_drains_every_running_batch_of_several_workers() -> None:
    model = OverlapModel(delay_s=0.05)
    engine = BatchingEngine(model, max_batch_size=1, workers=2)
    engine.start()
    pending = [asyncio.ensure_future(engine.embed(np.full((1, 1), i, np.float32))) for i in range(5)]
    await asyncio.sleep(0.01)  # two batches are running, three queued
    await engine.stop()
    assert [float(p.result()[0, 0]) for p in pending] == [2.0 * i for i in range(5)]
    with pytest.raises(EngineClosedError):
        await engine.embed(np.ones((1, 1), np.float32))


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        BatchingEngine(RecordingModel(), workers=0)


@pytest.mark.asyncio
async def test_lone_batches_use_lone_run_and_concurrent_ones_the_worker_run() -> None:
    shared = OverlapModel(delay_s=0.03)  # the per-worker session: a share of the cores
    lone = RecordingModel()  # the all-cores session
    engine = BatchingEngine(shared, max_batch_size=1, workers=2, lone_run=lone)
    engine.start()
    # Sequential requests: each batch starts with nothing else running or queued.
    for i in range(3):
        out = await engine.embed(np.full((1, 2), i, np.float32))
        np.testing.assert_array_equal(out, np.full((1, 2), 2.0 * i))
    assert lone.batch_sizes == [1, 1, 1]
    assert shared.threads == set()
    # Four at once with max_batch_size 1: the first batch starts while three wait, so none is lone.
    inputs = [np.full((1, 2), 10 + i, np.float32) for i in range(4)]
    outputs = await asyncio.gather(*(engine.embed(x) for x in inputs))
    await engine.stop()
    for x, y in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(y, x * 2.0)
    assert lone.batch_sizes == [1, 1, 1], "a batch with others queued or running must use the worker run"
    assert shared.most_active == 2


@pytest.mark.asyncio
async def test_stop_timeout_fails_queued_requests_and_does_not_hang_on_a_stuck_batch() -> None:
    model = RecordingModel()
    model.gate.clear()  # the first batch never finishes within the drain timeout
    engine = BatchingEngine(model, max_batch_size=1)
    engine.start()
    stuck = asyncio.ensure_future(engine.embed(np.ones((1, 1), np.float32)))
    queued = asyncio.ensure_future(engine.embed(np.ones((1, 1), np.float32)))
    await asyncio.sleep(0.02)
    start = time.perf_counter()
    await engine.stop(timeout_s=0.1)
    assert time.perf_counter() - start < 2.0
    with pytest.raises(EngineClosedError):
        await queued
    assert not stuck.done()
    model.gate.set()  # the stuck call ends; its thread delivers the result and exits
    np.testing.assert_array_equal(await asyncio.wait_for(stuck, 5.0), np.full((1, 1), 2.0))


@pytest.mark.asyncio
async def test_requests_of_one_loop_iteration_share_a_batch_and_later_ones_form_the_next() -> None:
    model = RecordingModel(delay_s=0.01)
    engine = BatchingEngine(model, max_batch_size=8, workers=1)
    engine.start()
    first = [asyncio.ensure_future(engine.embed(np.full((1, 1), i, np.float32))) for i in range(5)]
    await asyncio.sleep(0.002)  # the first batch (all five) is running
    later = [asyncio.ensure_future(engine.embed(np.full((1, 1), i, np.float32))) for i in range(5, 8)]
    outputs = await asyncio.gather(*first, *later)
    await engine.stop()
    assert model.batch_sizes == [5, 3]
    assert [float(o[0, 0]) for o in outputs] == [2.0 * i for i in range(8)]


@pytest.mark.asyncio
async def test_lone_batches_predicted_cheap_enough_run_on_the_event_loop_with_the_lone_run() -> None:
    threads: list[tuple[str, str]] = []
    worker, lone = _recorder(threads, "worker", 0.002), _recorder(threads, "lone", 0.002)
    engine = BatchingEngine(worker, max_batch_size=1, workers=2, lone_run=lone, lone_inline_max_ms=50.0)
    engine.start()
    for i in range(3):  # sequential: each batch starts alone
        np.testing.assert_array_equal(await engine.embed(np.full((1, 1), i, np.float32)), [[2.0 * i]])
    # The first has no timing yet and goes to a thread; the next run on the loop, on the lone run.
    assert threads[0][0] == "lone" and threads[0][1].startswith("idembed-infer")
    assert threads[1:] == [("lone", threading.main_thread().name)] * 2
    threads.clear()
    # Four at once: none starts alone, so none runs inline (50 ms would allow it) and none on the lone run.
    outputs = await asyncio.gather(*(engine.embed(np.full((1, 1), i, np.float32)) for i in range(4)))
    await engine.stop()
    assert [float(o[0, 0]) for o in outputs] == [0.0, 2.0, 4.0, 6.0]
    assert {kind for kind, _ in threads} == {"worker"}
    assert all(name.startswith("idembed-infer") for _, name in threads)


def test_inline_limits_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="lone_inline_max_ms"):
        BatchingEngine(RecordingModel(), lone_inline_max_ms=-1.0)


@pytest.mark.asyncio
async def test_lone_batches_move_to_the_worker_run_when_the_lone_run_is_measured_slower() -> None:
    worker = RecordingModel()  # fast: as a 1-thread session is on a busy host
    lone = RecordingModel(delay_s=0.01)  # slow: its threads are descheduled mid-call
    engine = BatchingEngine(worker, max_batch_size=1, workers=2, lone_run=lone)
    engine.start()
    for i in range(45):  # sequential: every batch starts alone
        np.testing.assert_array_equal(await engine.embed(np.full((1, 1), i, np.float32)), [[2.0 * i]])
    await engine.stop()
    # Batches 1-19 lone (nothing measured on the worker run yet), the 20th tries the worker run, which is
    # faster, so 21-39 use it; the 40th tries the lone run again (still slower), 41-45 the worker run.
    assert len(lone.batch_sizes) == 20
    assert len(worker.batch_sizes) == 25


@pytest.mark.asyncio
async def test_a_batch_is_not_alone_while_other_http_requests_are_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.core.inflight import IN_FLIGHT

    worker, lone = RecordingModel(), RecordingModel()
    engine = BatchingEngine(worker, max_batch_size=4, workers=2, lone_run=lone)
    engine.start()
    await engine.embed(np.ones((1, 1), np.float32))  # nothing else in the server: the lone run
    monkeypatch.setattr(IN_FLIGHT, "count", 3)  # two more requests being received or decoded
    await engine.embed(np.ones((1, 1), np.float32))
    await engine.stop()
    assert (len(lone.batch_sizes), len(worker.batch_sizes)) == (1, 1)


@pytest.mark.asyncio
async def test_a_burst_is_not_alone_and_never_runs_on_the_loop() -> None:
    """Requests arriving much faster than a batch runs (under load, the others still in the sockets, which
    IN_FLIGHT does not count) are not alone: their batch goes to a worker thread, not to the all-cores
    session on the event loop, where it held every arrival back. A sequential client stays alone."""
    loop = threading.current_thread().name
    threads: list[tuple[str, str]] = []
    worker, lone = _recorder(threads, "worker", 0.005), _recorder(threads, "lone", 0.005)
    # One worker: with two, a burst is shared among them and its first batch leaves requests queued, which
    # is not alone on its own count.
    engine = BatchingEngine(worker, max_batch_size=8, workers=1, lone_run=lone, lone_inline_max_ms=50.0)
    engine.start()
    for _ in range(3):  # sequential: alone; once timed, cheap enough to run on the loop with every core
        await engine.embed(np.ones((1, 1), np.float32))
    assert [kind for kind, _ in threads] == ["lone"] * 3 and [t for _, t in threads[1:]] == [loop] * 2
    await asyncio.gather(*(engine.embed(np.ones((1, 1), np.float32)) for _ in range(4)))  # a burst
    await engine.stop()
    assert len(threads) == 4 and threads[3][0] == "worker" and threads[3][1].startswith("idembed-infer")


@pytest.mark.asyncio
async def test_requests_that_cannot_be_batched_together_fail_instead_of_hanging() -> None:
    engine = BatchingEngine(RecordingModel(), max_batch_size=8)
    engine.start()
    results = await asyncio.gather(
        engine.embed(np.ones((1, 2), np.float32)),
        engine.embed(np.ones((1, 3), np.float32)),
        return_exceptions=True,
    )
    assert all(isinstance(r, ValueError) for r in results)
    np.testing.assert_array_equal(
        await engine.embed(np.ones((1, 2), np.float32)), [[2.0, 2.0]]
    )  # still serves
    await engine.stop()


class StartTimes(RecordingModel):
    """A RecordingModel that also records when each batch starts (perf_counter)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s)
        self.starts: list[float] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.starts.append(time.perf_counter())
        return super().__call__(batch)


@pytest.mark.asyncio
async def test_a_worker_takes_its_next_batch_without_waiting_for_the_event_loop() -> None:
    # A busy loop (reading and decoding other requests) ran the result callback late, and the worker waited
    # for it to be sent the next batch.
    model = StartTimes(delay_s=0.05)
    engine = BatchingEngine(model, max_batch_size=8, workers=1)
    engine.start()
    first = asyncio.ensure_future(engine.embed(_row(1)))
    await asyncio.sleep(0.01)  # the first batch runs
    second = asyncio.ensure_future(engine.embed(_row(2)))
    await asyncio.sleep(0)  # the second request is queued
    time.sleep(0.2)  # the event loop is busy: no callback runs until this returns
    unblocked = time.perf_counter()
    outputs = await asyncio.gather(first, second)
    await engine.stop()
    assert model.batch_sizes == [1, 1] and [float(o[0, 0]) for o in outputs] == [2.0, 4.0]
    assert model.starts[1] < unblocked - 0.1, "the second batch waited for the event loop"


@pytest.mark.asyncio
async def test_requests_a_worker_cannot_run_together_fail_and_the_worker_keeps_serving() -> None:
    model = RecordingModel(delay_s=0.05)
    engine = BatchingEngine(model, max_batch_size=8, workers=1)
    engine.start()
    first = asyncio.ensure_future(engine.embed(np.ones((1, 2), np.float32)))
    await asyncio.sleep(0.01)  # running; the next two are queued and the worker takes them together
    results = await asyncio.gather(
        first,
        engine.embed(np.ones((1, 2), np.float32)),
        engine.embed(np.ones((1, 3), np.float32)),
        return_exceptions=True,
    )
    np.testing.assert_array_equal(results[0], [[2.0, 2.0]])
    assert all(isinstance(r, ValueError) for r in results[1:])
    np.testing.assert_array_equal(await engine.embed(np.ones((1, 3), np.float32)), [[2.0, 2.0, 2.0]])
    await engine.stop()


@pytest.mark.asyncio
async def test_the_lone_session_comes_back_at_the_first_try_once_it_is_faster_again() -> None:
    worker = RecordingModel(delay_s=0.002)
    lone = RecordingModel(delay_s=0.01)  # a busy host
    engine = BatchingEngine(worker, max_batch_size=1, workers=2, lone_run=lone)
    engine.start()
    for i in range(39):  # 1-19 lone, the 20th tries the worker run (faster): 21-39 use it
        await engine.embed(np.full((1, 1), i, np.float32))
    lone.delay_s = 0.0  # the host went quiet
    for i in range(6):  # the 40th tries the lone run: at once preferred again, 41-45 use it
        await engine.embed(np.full((1, 1), i, np.float32))
    await engine.stop()
    assert len(lone.batch_sizes) == 19 + 1 + 5
    assert len(worker.batch_sizes) == 20
