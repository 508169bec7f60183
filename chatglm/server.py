"""What api.py and openai_api.py share: one generation worker behind a bounded FIFO queue, per-request
deadlines and cancellation, API-key checks, and the command-line options of both servers.

Why one worker thread: the engine runs one generation at a time anyway (its lock), and a model call must
never run on the event loop, or every other client (health checks included) would wait for it. Each request
becomes a `Job` in a FIFO queue; the worker thread pulls jobs one by one and runs their engine generator to
the end, handing every item back as it is produced. The event loop only awaits those items, so it stays free
to accept, answer /health, reject with 429, and notice disconnects while a model call runs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, Generic, TypeVar

import torch
from pydantic import AfterValidator

from .cli import add_generation_arguments, add_model_arguments, positive_int

logger = logging.getLogger("chatglm.server")

T = TypeVar("T")

# A generous upper bound on how many characters one token of a ChatGLM tokenizer can stand for (the longest
# is ChatGLM-6B's <|blank_80|>, 80 spaces). Text longer than context * this cannot fit, so it is rejected
# without tokenizing it (tokenizing 1 MB costs about a second of CPU on this kind of machine).
MAX_CHARS_PER_TOKEN = 100


def _encodable(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); they cannot become UTF-8, so the tokenizer (and the JSON
    # encoder of any answer echoing them) would fail deep inside with a 500. Refuse them at the door.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from None
    return text


# A request string field: any str that can be encoded as UTF-8.
Text = Annotated[str, AfterValidator(_encodable)]


class QueueFull(Exception):
    """One request is generating and `max_queue` more are waiting; `retry_after` is a rough wait in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the server is busy: too many requests are waiting")
        self.retry_after = retry_after


class RequestTimeout(Exception):
    """The request's deadline passed while it was waiting or generating."""


class JobCancelled(Exception):
    """The job was cancelled (its client went away, or the server is shutting down)."""


class Job:
    """One request's model call: `run(should_stop)` makes the engine iterator; `on_item` / `on_end` are
    called from the worker thread with each item and once at the end (None, or the exception)."""

    def __init__(
        self,
        run: Callable[[Callable[[], bool]], Iterator[Any]],
        on_item: Callable[[Any], None],
        on_end: Callable[[BaseException | None], None],
        timeout: float | None,
    ) -> None:
        self.run = run
        self.on_item = on_item
        self.on_end = on_end
        self.submitted = time.monotonic()
        self.deadline = None if not timeout else self.submitted + timeout
        self.started: float | None = None
        self._cancel = threading.Event()
        # Set once should_stop() has answered True: the engine then ends the generation early.
        self.stop_seen = False

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def should_stop(self) -> bool:
        # Polled by the engine between decode steps, so a cancel or a deadline ends generation within one step.
        stop = self._cancel.is_set() or self.expired
        if stop:
            self.stop_seen = True
        return stop


class GenerationWorker:
    """A single worker thread that runs jobs in FIFO order: one generating, at most `max_queue` waiting."""

    def __init__(
        self,
        *,
        max_queue: int = 64,
        timeout: float | None = None,
        after_job: Callable[[], None] | None = None,
    ) -> None:
        self.max_queue = max_queue
        self.timeout = timeout or None
        self.after_job = after_job
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counts = {"completed": 0, "cancelled": 0, "timed_out": 0, "failed": 0, "rejected": 0}
        # Moving average of a job's run time; only used to suggest a Retry-After.
        self._average_seconds = 1.0

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="chatglm-generation", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and end the thread (the running job stops at its next decode step)."""
        with self._cond:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            if self._running is not None:
                self._running.cancel()
            self._cond.notify_all()
        for job in waiting:
            self._finish(job, JobCancelled("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- submitting -------------------------------------------------------------------------------------------

    def submit(
        self,
        run: Callable[[Callable[[], bool]], Iterator[Any]],
        on_item: Callable[[Any], None],
        on_end: Callable[[BaseException | None], None],
    ) -> Job:
        """Queue a job; raises QueueFull (with a Retry-After estimate) when `max_queue` jobs already wait."""
        job = Job(run, on_item, on_end, self.timeout)
        with self._cond:
            if self._stopping:
                raise JobCancelled("the server is shutting down")
            if self._in_flight_locked() > self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(self._retry_after_locked())
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def withdraw(self, job: Job, reason: BaseException | None = None) -> None:
        """Cancel a job; one still waiting leaves the queue at once, so it no longer takes a place."""
        job.cancel()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
        self._finish(job, reason or JobCancelled("cancelled while waiting"))

    def is_full(self) -> bool:
        with self._cond:
            return self._in_flight_locked() > self.max_queue

    def _in_flight_locked(self) -> int:
        # Counted together: a job just submitted may not have been picked up yet, and must not make the
        # queue look full while the worker is in fact idle.
        return len(self._waiting) + (self._running is not None)

    def retry_after(self) -> int:
        with self._cond:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> int:
        # Time for the queue ahead to drain, as a whole number of seconds the SDKs accept (they honour 0..60).
        estimate = self._average_seconds * (len(self._waiting) + (self._running is not None))
        return int(min(60, max(1, math.ceil(estimate))))

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "running": int(self._running is not None),
                "waiting": len(self._waiting),
                "max_queue": self.max_queue,
                "timeout_s": self.timeout,
                **self.counts,
            }

    # -- the worker thread ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                self._running = job
            error = self._run(job)
            with self._cond:
                self._running = None
                if job.started is not None:
                    self._average_seconds = 0.8 * self._average_seconds + 0.2 * (time.monotonic() - job.started)
            if self.after_job is not None:
                try:
                    self.after_job()
                except Exception:  # a cache flush failing must not take the worker down
                    logger.exception("after_job hook failed")
            self._finish(job, error)

    def _run(self, job: Job) -> BaseException | None:
        if job.cancel_requested:
            return JobCancelled("cancelled while waiting")
        if job.expired:
            return RequestTimeout("the request timed out while waiting in the queue")
        job.started = time.monotonic()
        try:
            with contextlib.closing(job.run(job.should_stop)) as items:
                for item in items:
                    job.on_item(item)
                    # Iterators without a cancel hook (stream_chat) stop here; closing them frees the engine.
                    if job.should_stop():
                        break
        except Exception as exc:  # reported to the request that caused it; the worker goes on
            if not isinstance(exc, (RequestTimeout, JobCancelled)):
                logger.exception("generation failed")
            return exc
        if job.stop_seen:
            if job.expired:
                return RequestTimeout("the request timed out while generating")
            return JobCancelled("cancelled")
        return None

    def _finish(self, job: Job, error: BaseException | None) -> None:
        with self._cond:
            if error is None:
                self.counts["completed"] += 1
            elif isinstance(error, JobCancelled):
                self.counts["cancelled"] += 1
            elif isinstance(error, RequestTimeout):
                self.counts["timed_out"] += 1
            else:
                self.counts["failed"] += 1
        try:
            job.on_end(error)
        except Exception:
            logger.exception("on_end callback failed")


class AsyncJobStream(Generic[T]):
    """Submit a job and iterate its items on the event loop: `async for item in stream`.

    Items cross from the worker thread through `call_soon_threadsafe` into an asyncio queue. The request's
    deadline is also enforced here, so a client is answered at its deadline even if the job is still queued.
    `close()` (or leaving `async with`) withdraws the job: a disconnected client stops its generation.
    """

    _ITEM, _END = 0, 1

    def __init__(self, worker: GenerationWorker, run: Callable[[Callable[[], bool]], Iterator[T]]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._worker = worker
        self._done = False
        self.job: Job | None = None
        self.job = worker.submit(run, self._from_worker(self._ITEM), self._from_worker(self._END))

    def _from_worker(self, kind: int) -> Callable[[Any], None]:
        def deliver(value: Any) -> None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop is gone (server shutting down): nobody is listening any more
                if self.job is not None:
                    self.job.cancel()

        return deliver

    def __aiter__(self) -> AsyncJobStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._done:
            raise StopAsyncIteration
        try:
            kind, value = await asyncio.wait_for(self._queue.get(), self.job.remaining())
        except asyncio.TimeoutError:
            self._done = True
            error = RequestTimeout("the request timed out")
            self._worker.withdraw(self.job, error)
            raise error from None
        if kind == self._ITEM:
            return value
        self._done = True
        if value is not None:
            raise value
        raise StopAsyncIteration

    def close(self) -> None:
        """Stop the job if it has not ended (harmless after the end)."""
        if not self._done:
            self._done = True
            self._worker.withdraw(self.job)

    async def __aenter__(self) -> AsyncJobStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def wait_for_disconnect(receive: Callable[[], Any]) -> None:
    """Return when the client closes the connection (the request body must already have been read)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


async def consume(stream: AsyncJobStream[T], receive: Callable[[], Any], on_item: Callable[[T], None]) -> bool:
    """Feed every item of `stream` to `on_item`; a client that disconnects meanwhile cancels the job,
    whether it is still queued or already generating.

    Returns False when the client went away (there is nobody to answer then). Raises what the job raised.
    """
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    watcher.add_done_callback(lambda _: stream.close())
    try:
        async for item in stream:
            on_item(item)
    except JobCancelled:
        if watcher.done() and not watcher.cancelled():
            return False
        raise
    finally:
        gone = watcher.done() and not watcher.cancelled()
        watcher.cancel()
        stream.close()
    return not gone


def empty_cuda_cache() -> None:
    """Give cached GPU memory back between requests (what the original servers did after every call)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def too_long_to_tokenize(texts: Iterable[str], context: int) -> bool:
    """True when the texts cannot possibly fit in `context` tokens, judged by length alone (no tokenizing)."""
    return sum(len(t) for t in texts) > context * MAX_CHARS_PER_TOKEN


# -- API keys ---------------------------------------------------------------------------------------------------


class ApiKeys:
    """Bearer API keys; with none configured every request passes (the header the SDKs always send is ignored)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        # Comparing fixed-size digests keeps the comparison time independent of the keys' lengths too.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header value carries one of the keys, checked in constant time."""
        if not self._digests:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            token = ""
        digest = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for key in self._digests:  # no early exit: every key is compared every time
            matched |= hmac.compare_digest(key, digest)
        return matched


def split_list(values: Iterable[str] | None) -> list[str]:
    """Flatten repeated and comma-separated option values: ["a,b", "c"] -> ["a", "b", "c"]."""
    items: list[str] = []
    for value in values or []:
        items.extend(part.strip() for part in value.split(",") if part.strip())
    return items


def api_keys_from(flag_values: Iterable[str] | None, env_var: str = "CHATGLM_API_KEYS") -> ApiKeys:
    """Keys from --api-key options plus the comma-separated environment variable."""
    return ApiKeys(split_list(flag_values) + split_list([os.environ.get(env_var, "")]))


# -- command line -----------------------------------------------------------------------------------------------


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0 (0: no limit), got {text}")
    return value


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """--host/--port, the shared model and generation flags, and the queue options both servers take."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; use 0.0.0.0 to serve other machines)")
    group.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    group.add_argument("--max-queue", type=_non_negative_int, default=64,
                       help="requests that may wait behind the one generating; more are refused with 429 (default 64)")
    group.add_argument("--timeout", type=_seconds, default=600.0,
                       help="seconds a request may take, waiting included; 0 = no limit (default 600)")
    group.add_argument("--max-new-tokens", type=positive_int, default=None,
                       help="cap on the tokens generated for one request (default: up to the context length)")
    group.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_model_arguments(parser)
    add_generation_arguments(parser)
