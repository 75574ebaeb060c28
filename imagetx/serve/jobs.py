"""The server's work queue: one worker thread computes (the models share the device and its
cores), requests wait for it up to a bound and beyond it are refused, and a request whose client
has gone is cancelled, running or waiting.

A job reports while it runs through `emit(event, data)`, which a streaming response turns into
server-sent events; the computation checks `job.check()` between steps (the decoder's watch
callback), which raises Cancelled once the client has gone."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor


QUEUE = 4  # requests running or waiting, by default (imagetx serve --queue); more get 503


class Busy(Exception):
    """More requests than the queue's bound: the response is 503 with this message."""


class Cancelled(Exception):
    """The client of a job went away: the job stops at its next step."""


class Job:
    """One request's work: a cancel flag, and where its events go (nowhere unless streamed)."""

    def __init__(self, jobs: "Jobs"):
        self._jobs = jobs
        self._cancelled = threading.Event()
        self.emit: Callable[[str, dict], None] = lambda event, data: None

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise Cancelled once the job's client has gone (called between decoding steps)."""
        if self._cancelled.is_set():
            raise Cancelled()


class Jobs:
    """At most `bound` requests running or waiting; more raise Busy. Counts what happened to
    each (GET /api/status)."""

    def __init__(self, bound: int):
        if bound < 1:
            raise ValueError(f"the queue bound must be >= 1, got {bound}")
        self.bound = bound
        self._lock = threading.Lock()
        self._pending = 0
        self.counts: Counter = Counter()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagetx-serve")

    @property
    def pending(self) -> int:
        return self._pending

    def admit(self) -> Job:
        """A new job, or Busy when `bound` are already running or waiting."""
        with self._lock:
            if self._pending >= self.bound:
                self.counts["refused"] += 1
                raise Busy(f"the server is busy: {self._pending} requests are running or waiting, the most it "
                           "queues; try again shortly")
            self._pending += 1
            self.counts["admitted"] += 1
        return Job(self)

    def _run(self, job: Job, fn: Callable, args: tuple):
        try:
            job.check()  # its client left while it waited
            result = fn(job, *args)
            self.counts["done"] += 1
            return result
        except Cancelled:
            self.counts["cancelled"] += 1
            raise
        except Exception:
            self.counts["failed"] += 1
            raise
        finally:
            with self._lock:
                self._pending -= 1

    def submit(self, job: Job, fn: Callable, *args) -> asyncio.Future:
        """Run fn(job, *args) on the worker thread -> an asyncio future of its result."""
        return asyncio.get_running_loop().run_in_executor(self._executor, self._run, job, fn, args)

    def status(self) -> dict:
        return {"pending": self._pending, "bound": self.bound, **{k: self.counts[k] for k in
                                                                  ("admitted", "done", "cancelled", "failed", "refused")}}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def sse(event: str, data: dict) -> bytes:
    """One server-sent event: `event: NAME` and one `data:` line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def stream_events(jobs: Jobs, job: Job, fn: Callable, args: tuple,
                        describe_error: Callable[[BaseException], tuple[int, str]]) -> AsyncIterator[bytes]:
    """Run a job and yield its events as they come, then `result` (its return value) or
    `error` ({"error", "status"}). When the response is abandoned (the client disconnected) the
    job is cancelled."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job.emit = lambda event, data: loop.call_soon_threadsafe(queue.put_nowait, (event, data))
    future = jobs.submit(job, fn, *args)

    def finished(f: asyncio.Future) -> None:
        if not f.cancelled():
            f.exception()  # read even when nobody listens any more: asyncio would log it as lost
        queue.put_nowait(None)

    future.add_done_callback(finished)
    try:
        while (item := await queue.get()) is not None:
            yield sse(*item)
        if future.exception() is not None:
            status, message = describe_error(future.exception())
            yield sse("error", {"error": message, "status": status})
        else:
            yield sse("result", future.result())
    finally:
        job.cancel()  # a no-op once it is done; stops it when the client has gone
