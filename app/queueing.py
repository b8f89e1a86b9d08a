"""A bounded, ordered queue of generation jobs in front of the one generation worker.

The pipeline runs one generation at a time, so jobs wait here in arrival order. Beyond `max_waiting`
waiting jobs a new request is refused at once (429) instead of piling up; a job that waited longer
than `timeout_s`, or whose client went away, gives its place back and never runs.

The queue holds typed `GenerationJob`s, not closures, so what waits is visible and can be grouped:
the worker takes the oldest job and, up to `batch_max_size`, later jobs that can share its denoising
loop (same size, steps, guidance and sampler). It prefers jobs with the oldest job's exact LoRA set
(the engine merges it into the weights once); it mixes sets (per-image low-rank deltas) only when
that at least doubles the batch, and only where `mixed` is allowed. The oldest job always goes in the
next loop, so no job waits behind later ones indefinitely. A watchdog notices a worker that makes
no progress while work waits.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from app.errors import ClientGone, JobCanceled, QueueFull, QueueTimeout, ServiceUnavailable
from app.jobs import GenerationJob, JobResult

logger = logging.getLogger(__name__)

# execute(jobs, on_step) -> one result per job; on_step() is called as the loop makes progress (each
# denoising step). The jobs share one denoising loop.
Executor = Callable[[list[GenerationJob], Callable[[], None]], list[JobResult]]
Disconnected = Callable[[], Awaitable[bool]] | None
POLL_S = 0.25


@dataclass
class _Entry:
    job: GenerationJob
    context: contextvars.Context  # the request's context: the worker's log lines carry its request id
    future: Future = field(default_factory=Future)
    started_at: float | None = None
    on_start: Callable[[], None] | None = None


def _discarded(entry: _Entry) -> bool:
    return entry.job.control is not None and entry.job.control.discarded


class GenerationQueue:
    def __init__(
        self,
        execute: Executor,
        max_waiting: int,
        timeout_s: float,
        watchdog_s: float = 0.0,
        batch_max_size: int = 1,
        batch_wait_ms: float = 0.0,
        mixed: bool = True,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.watchdog_s = watchdog_s
        self.batch_max_size = batch_max_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.mixed = mixed
        self._on_batch = on_batch
        self._execute = execute
        self._pending: deque[_Entry] = deque()
        self._cond = threading.Condition()
        self._waiting = 0  # places taken: reserved, and queued but not started
        self._running = 0
        self._last_batch_size = 0
        self._closed = False
        self._recent_ms = 1000.0  # moving estimate of one job, for Retry-After
        self._last_progress = time.monotonic()
        self._stall_reported = False
        self._worker = threading.Thread(target=self._work, name="generation", daemon=True)
        self._worker.start()
        if watchdog_s > 0:
            threading.Thread(target=self._watch, name="generation-watchdog", daemon=True).start()

    # ---- places ------------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Jobs waiting (or reserved) plus the one running."""
        with self._cond:
            return self._waiting + self._running

    def reserve(self) -> None:
        """Take a waiting place, or raise QueueFull. Call `release_reservation` if no job is submitted."""
        with self._cond:
            if self._waiting >= self.max_waiting + (0 if self._running else 1):
                retry = max(1, round((self._waiting + 1) * self._recent_ms / 1000))
                raise QueueFull(self._waiting, retry)
            if self._waiting + self._running == 0:
                self._last_progress = time.monotonic()  # idle time is not a stall
            self._waiting += 1

    def release_reservation(self) -> None:
        with self._cond:
            self._waiting -= 1

    async def wait_for_place(self, disconnected: Disconnected = None) -> None:
        """Reserve a place, waiting (not failing) while the queue is full: for work already under way."""
        deadline = time.perf_counter() + self.timeout_s
        while True:
            try:
                return self.reserve()
            except QueueFull:
                if disconnected is not None and await disconnected():
                    raise ClientGone() from None
                if time.perf_counter() > deadline:
                    raise QueueTimeout(f"waited more than {self.timeout_s:g} s for a place in the queue") from None
                await asyncio.sleep(0.05)

    # ---- jobs --------------------------------------------------------------------------------------

    async def submit(self, job: GenerationJob, disconnected: Disconnected = None) -> tuple[JobResult, float]:
        """Run `job` on the worker, after a `reserve()` (whose place it takes over). Returns (result, ms waited)."""
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        entry = _Entry(job, contextvars.copy_context(), on_start=lambda: loop.call_soon_threadsafe(started.set))
        submitted = time.perf_counter()
        with self._cond:
            if self._closed:
                self._waiting -= 1
                raise ServiceUnavailable("the service is shutting down")
            self._pending.append(entry)
            self._cond.notify()
        try:
            await self._wait_for_start(entry, started, submitted, disconnected)
            result = await asyncio.wrap_future(entry.future)
        except BaseException:
            if entry.future.cancel():  # never started: give the place back; the worker skips it
                self.release_reservation()
            raise
        return result, (entry.started_at - submitted) * 1000

    async def _wait_for_start(self, entry: _Entry, started: asyncio.Event, submitted: float, disconnected) -> None:
        deadline = submitted + self.timeout_s
        while not started.is_set():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise QueueTimeout(f"the request waited more than {self.timeout_s:g} s for the generation worker")
            try:
                await asyncio.wait_for(started.wait(), timeout=min(POLL_S, remaining))
            except TimeoutError:
                if disconnected is not None and await disconnected():
                    raise ClientGone() from None

    def _work(self) -> None:
        while True:
            entries = self._take_batch()
            if not entries:
                return
            started_at = time.perf_counter()
            for entry in entries:
                entry.started_at = started_at
                entry.on_start()
                if entry.job.control is not None:
                    entry.job.control.start()
            if self._on_batch is not None:
                self._on_batch(len(entries))
            jobs = [entry.job for entry in entries]
            results, error = None, None
            try:
                # Run in the oldest request's context, so the worker's log lines carry a request id.
                results = entries[0].context.run(self._execute, jobs, self._progress)
            except BaseException as exc:  # every request of the batch gets the error; the worker goes on
                error = exc
            with self._cond:  # before the answers, so a request that got its image sees the queue without it
                self._running -= len(entries)
                self._last_progress = time.monotonic()
                per_job_ms = (time.perf_counter() - started_at) * 1000 / len(entries)
                self._recent_ms = 0.8 * self._recent_ms + 0.2 * per_job_ms
            for i, entry in enumerate(entries):
                if _discarded(entry):  # canceled while it ran (StepControl.cancel): its image is dropped
                    entry.future.set_exception(JobCanceled())
                elif error is None:
                    entry.future.set_result(results[i])  # a request that left meanwhile just drops it
                else:
                    entry.future.set_exception(error)

    def _take_batch(self) -> list[_Entry]:
        """The oldest job and the waiting jobs that share its loop (see the module docstring); [] when closed."""
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return []
                head = self._pending[0]
                if not head.future.set_running_or_notify_cancel():
                    self._pending.popleft()  # cancelled while waiting; its place was already given back
                    continue
                if _discarded(head):  # canceled while it waited: it never starts, its place is free
                    self._pending.popleft()
                    self._waiting -= 1
                    head.future.set_exception(JobCanceled())
                    head.on_start()
                    continue
                break
            self._pending.popleft()
            # Wait for companions only where they can come: other requests are on their way (reserved,
            # loading their LoRAs, or queued), or the last loop was shared. A lone client never waits.
            canceled = sum(1 for entry in self._pending if _discarded(entry))  # never start: not companions
            concurrent = self._waiting - canceled > 1 or self._last_batch_size > 1
            deadline = time.monotonic() + (self.batch_wait_s if concurrent else 0.0)
            while (
                self.batch_max_size > 1
                and len(self._companions(head)) + 1 < self.batch_max_size
                and (remaining := deadline - time.monotonic()) > 0
                and not self._closed
            ):
                self._cond.wait(remaining)  # a short wait for more jobs to fill the loop
            batch = [head]
            for entry in self._companions(head):
                self._pending.remove(entry)
                if entry.future.set_running_or_notify_cancel():
                    batch.append(entry)
            # A companion canceled while it waited is taken out of the queue with the batch and fails at once.
            for entry in [e for e in batch if _discarded(e)]:
                batch.remove(entry)
                self._waiting -= 1
                entry.future.set_exception(JobCanceled())
                entry.on_start()
            self._waiting -= len(batch)
            self._running += len(batch)
            self._last_batch_size = len(batch)
            self._last_progress = time.monotonic()
            return batch

    def _companions(self, head: _Entry) -> list[_Entry]:
        """Waiting jobs to run with `head`, oldest first: its exact LoRA set, or any set when mixing at
        least doubles the batch (merging once costs less than per-image deltas at every step)."""
        room = self.batch_max_size - 1
        if room <= 0:
            return []
        compatible = [
            e
            for e in self._pending
            if e.job.batch_key == head.job.batch_key and not e.future.done() and not _discarded(e)
        ]
        same_set = [e for e in compatible if e.job.merge_signature == head.job.merge_signature][:room]
        if self.mixed and min(len(compatible), room) + 1 >= 2 * (len(same_set) + 1):
            return compatible[:room]
        return same_set

    # ---- health ------------------------------------------------------------------------------------

    def _progress(self) -> None:
        self._last_progress = time.monotonic()

    def stalled_for(self) -> float | None:
        """Seconds without progress while work waits, once past the watchdog's limit; None when healthy."""
        if self.watchdog_s <= 0:
            return None
        with self._cond:
            idle = self._waiting + self._running == 0
            silent = time.monotonic() - self._last_progress
        return None if idle or silent <= self.watchdog_s else silent

    def _watch(self) -> None:
        interval = min(1.0, self.watchdog_s / 4)
        while not self._closed:
            time.sleep(interval)
            stalled = self.stalled_for()
            if stalled is not None and not self._stall_reported:
                logger.error(
                    "watchdog: the generation worker has made no progress for %.0f s with %d requests waiting "
                    "(WATCHDOG_S=%g); /ready reports 503 until it moves again", stalled, self.depth, self.watchdog_s,
                )  # fmt: skip
                self._stall_reported = True
            elif stalled is None and self._stall_reported:
                logger.warning("watchdog: the generation worker is making progress again")
                self._stall_reported = False

    def shutdown(self) -> None:
        """Stop taking jobs; jobs not yet started are answered 503. The running one finishes."""
        with self._cond:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for entry in dropped:
            if entry.future.set_running_or_notify_cancel():
                entry.future.set_exception(ServiceUnavailable("the service is shutting down"))
                entry.on_start()

    @property
    def closed(self) -> bool:
        return self._closed
