"""A bounded, ordered queue in front of the one generation worker.

The pipeline runs one generation at a time, so requests wait here in arrival order. Beyond
`max_waiting` waiting requests a new one is refused at once (429) instead of piling up; a request
that waited longer than `timeout_s`, or whose client went away, gives its place back.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"{waiting} requests are already waiting; try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class QueueTimeout(Exception):
    pass


class ClientGone(Exception):
    pass


class GenerationQueue:
    def __init__(self, max_waiting: int, timeout_s: float):
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation")
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._closed = False
        self._recent_ms = 1000.0  # moving estimate of one job, for Retry-After

    @property
    def depth(self) -> int:
        """Requests waiting plus the one running."""
        with self._lock:
            return self._waiting + self._running

    def reserve(self) -> None:
        """Take a waiting place, or raise QueueFull. Call `release_reservation` if the job never runs."""
        with self._lock:
            if self._waiting >= self.max_waiting + (0 if self._running else 1):
                retry = max(1, round((self._waiting + 1) * self._recent_ms / 1000))
                raise QueueFull(self._waiting, retry)
            self._waiting += 1

    def release_reservation(self) -> None:
        with self._lock:
            self._waiting -= 1

    async def run(
        self, fn: Callable[[], T], disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> tuple[T, float]:
        """Run `fn` on the worker after a `reserve()`. Returns (result, ms spent waiting)."""
        loop = asyncio.get_running_loop()
        submitted = time.perf_counter()
        started = asyncio.Event()
        started_at: list[float] = []

        def job():
            with self._lock:
                self._waiting -= 1
                self._running += 1
            started_at.append(time.perf_counter())
            loop.call_soon_threadsafe(started.set)
            try:
                return fn()
            finally:
                with self._lock:
                    self._running -= 1
                    self._recent_ms = 0.8 * self._recent_ms + 0.2 * (time.perf_counter() - started_at[0]) * 1000

        # Run in a copy of this request's context, so the worker's log lines carry its request id.
        future: Future = self._executor.submit(contextvars.copy_context().run, job)
        try:
            await self._wait_for_start(started, submitted, disconnected)
            result = await asyncio.wrap_future(future)
        except BaseException:
            if future.cancel():  # never started: give the place back
                self.release_reservation()
            raise
        return result, (started_at[0] - submitted) * 1000

    async def _wait_for_start(self, started: asyncio.Event, submitted: float, disconnected) -> None:
        deadline = submitted + self.timeout_s
        while not started.is_set():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise QueueTimeout(f"the request waited more than {self.timeout_s:g} s for the generation worker")
            try:
                await asyncio.wait_for(started.wait(), timeout=min(0.25, remaining))
            except TimeoutError:
                if disconnected is not None and await disconnected():
                    raise ClientGone() from None

    def shutdown(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def closed(self) -> bool:
        return self._closed


__all__ = ["GenerationQueue", "QueueFull", "QueueTimeout", "ClientGone", "CancelledError"]
