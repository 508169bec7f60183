"""chatglm.server without a model: the worker's queue, deadlines and cancellation, and the API-key check."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from chatglm.server import (
    ApiKeys,
    AsyncJobStream,
    GenerationWorker,
    JobCancelled,
    QueueFull,
    RequestTimeout,
    api_keys_from,
    split_list,
    too_long_to_tokenize,
)


def ticking(n: int, step_s: float, log: list | None = None):
    """A fake engine generator: n items, step_s apart, polling should_stop like stream_completion does."""

    def run(should_stop) -> Iterator[int]:
        for i in range(n):
            if should_stop():
                return
            time.sleep(step_s)
            if log is not None:
                log.append(i)
            yield i

    return run


@pytest.fixture
def worker() -> GenerationWorker:
    w = GenerationWorker(max_queue=3, timeout=None)
    w.start()
    yield w
    w.stop()


def collect(worker: GenerationWorker, run) -> list:
    async def go() -> list:
        return [item async for item in AsyncJobStream(worker, run)]

    return asyncio.run(go())


def test_items_arrive_in_order_and_jobs_run_one_at_a_time(worker: GenerationWorker) -> None:
    active, peak = [0], [0]

    def run(should_stop) -> Iterator[int]:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        try:
            yield from ticking(5, 0.002)(should_stop)
        finally:
            active[0] -= 1

    async def go() -> list[list[int]]:
        async def one() -> list[int]:
            return [item async for item in AsyncJobStream(worker, run)]

        return await asyncio.gather(one(), one(), one())

    assert asyncio.run(go()) == [[0, 1, 2, 3, 4]] * 3
    assert peak[0] == 1


def test_queue_full_is_refused_with_a_retry_after(worker: GenerationWorker) -> None:
    gate = threading.Event()

    def blocked(should_stop) -> Iterator[int]:
        while not gate.is_set() and not should_stop():
            time.sleep(0.005)
        yield 1

    ends: list = []
    worker.submit(blocked, lambda _: None, ends.append)
    assert _wait(lambda: worker.stats()["running"] == 1)
    for _ in range(3):
        worker.submit(blocked, lambda _: None, ends.append)
    with pytest.raises(QueueFull) as caught:
        worker.submit(blocked, lambda _: None, ends.append)
    assert 1 <= caught.value.retry_after <= 60
    gate.set()
    assert _wait(lambda: len(ends) == 4)
    assert ends == [None] * 4 and worker.stats()["rejected"] == 1


def test_cancelling_a_running_job_stops_it_within_a_step(worker: GenerationWorker) -> None:
    produced: list[int] = []

    async def go() -> None:
        stream = AsyncJobStream(worker, ticking(1000, 0.01, produced))
        async for item in stream:
            if item == 2:
                stream.close()
                break

    asyncio.run(go())
    assert _wait(lambda: worker.stats()["running"] == 0)
    assert len(produced) <= 4 and worker.stats()["cancelled"] == 1


def test_a_withdrawn_waiting_job_never_runs(worker: GenerationWorker) -> None:
    gate, ran, ends = threading.Event(), [], []

    def first(should_stop) -> Iterator[int]:
        gate.wait(5)
        yield 0

    def second(should_stop) -> Iterator[int]:
        ran.append(True)
        yield 0

    worker.submit(first, lambda _: None, lambda _: None)
    assert _wait(lambda: worker.stats()["running"] == 1)
    job = worker.submit(second, lambda _: None, ends.append)
    worker.withdraw(job)
    assert worker.stats()["waiting"] == 0
    gate.set()
    assert _wait(lambda: ends and worker.stats()["running"] == 0)
    assert not ran and isinstance(ends[0], JobCancelled)


def test_deadline_while_generating_and_while_waiting() -> None:
    worker = GenerationWorker(max_queue=4, timeout=0.3)
    worker.start()
    try:
        async def go() -> tuple[list, list]:
            async def one() -> list:
                items: list = []
                try:
                    async for item in AsyncJobStream(worker, ticking(1000, 0.01)):
                        items.append(item)
                except RequestTimeout as exc:
                    items.append(exc)
                return items

            return await asyncio.gather(one(), one())

        start = time.monotonic()
        running, waiting = asyncio.run(go())
        assert time.monotonic() - start < 2.0
        assert isinstance(running[-1], RequestTimeout) and len(running) > 1
        assert isinstance(waiting[-1], RequestTimeout)
        assert _wait(lambda: worker.stats()["timed_out"] == 2)
    finally:
        worker.stop()


def test_a_failing_job_is_reported_and_the_worker_goes_on(worker: GenerationWorker) -> None:
    def broken(should_stop) -> Iterator[int]:
        yield 1
        raise ValueError("bad argument")

    with pytest.raises(ValueError, match="bad argument"):
        collect(worker, broken)
    assert collect(worker, ticking(2, 0)) == [0, 1]


def test_api_keys() -> None:
    assert ApiKeys().allows(None) and ApiKeys().allows("Bearer anything")
    keys = ApiKeys(["sk-one", "sk-two-longer"])
    assert keys.enabled and len(keys) == 2
    assert keys.allows("Bearer sk-one") and keys.allows("bearer  sk-two-longer ")
    for header in (None, "", "Bearer", "Bearer sk-on", "Bearer sk-one2", "Basic sk-one", "sk-one"):
        assert not keys.allows(header), header


def test_keys_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATGLM_API_KEYS", " env-1, env-2 ,")
    keys = api_keys_from(["flag-1,flag-2", "flag-3"])
    assert len(keys) == 5 and keys.allows("Bearer env-2") and keys.allows("Bearer flag-3")
    monkeypatch.delenv("CHATGLM_API_KEYS")
    assert not api_keys_from(None).enabled
    assert split_list(["a, b", "", "c"]) == ["a", "b", "c"]


def test_length_pre_check() -> None:
    assert not too_long_to_tokenize(["x" * 1000], context=2048)
    assert too_long_to_tokenize(["x" * (1 << 20)], context=2048)


def _wait(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())
