"""The job runner: takes queued jobs from the store, runs each through `GenerationService.generate`
(the path of /generate: same queue, same batching, same images), follows its steps, stops it on
cancel, writes its outcome, and calls its webhook.

The store is the source of truth. The runner hands the service at most `max_inflight` jobs at a time
(enough to fill a batch), oldest first, so the queue of /generate keeps its own bound and jobs feed it
as it frees. At start-up, jobs left `running` by a process that is gone are queued again; they run
with their stored seed, so they give the image they would have given.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.errors import JobCanceled, QueueFull, QueueTimeout, ServiceUnavailable
from app.jobqueue import webhooks
from app.jobqueue.store import CANCELED, ENDED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobRecord, JobStore
from app.jobs import StepControl

logger = logging.getLogger(__name__)

PURGE_EVERY_S = 60.0
RETRY_FULL_S = 0.05  # a full /generate queue: try again this soon (it frees one loop at a time)


@dataclass(frozen=True)
class JobEvent:
    name: str  # queued | running | progress | succeeded | failed | canceled
    data: dict

    @property
    def terminal(self) -> bool:
        return self.name in ENDED


class JobRunner:
    def __init__(
        self,
        data_dir: Path,
        service: Callable[[], object | None],
        accepting: Callable[[], bool],
        to_result: Callable[[object], dict],
        to_error: Callable[[BaseException], dict],
        max_inflight: int,
        preview_every: int,
        ttl_s: float,
        webhook_secret: str | None,
        webhook_backoff_s: float,
        on_status: Callable[[str], None] | None = None,
    ):
        self.data_dir = Path(data_dir)
        self._on_status = on_status
        self._store: JobStore | None = None
        self._store_lock = threading.Lock()
        self._service = service  # the GenerationService once the model is loaded, else None
        self._accepting = accepting  # False while draining: no new job is started
        self._to_result = to_result  # GenerationOutcome -> /generate's reply without `image`
        self._to_error = to_error  # exception -> {status, detail}, as the HTTP API answers it
        self.max_inflight = max(1, max_inflight)
        self.preview_every = preview_every
        self.ttl_s = ttl_s
        self._secret = webhook_secret
        self._backoff_s = webhook_backoff_s
        self._tasks: dict[str, asyncio.Task] = {}
        self._controls: dict[str, StepControl] = {}
        self._subscribers: dict[str, set[asyncio.Queue]] = {}
        self._background: set[asyncio.Task] = set()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._feeder: asyncio.Task | None = None
        self._stopping = False

    # ---- life cycle ------------------------------------------------------------------------------

    @property
    def store(self) -> JobStore:
        """The store, opened on first use (an app that never takes a job writes no file)."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = JobStore(self.data_dir, self._on_status)
        return self._store

    def start(self) -> None:
        """On the event loop: replay what the last process left (when there is a store), then feed the service."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stopping = False
        if JobStore.exists(self.data_dir):
            interrupted = self.store.requeue_interrupted()
            if interrupted:
                logger.warning(
                    "jobs: %d jobs were running when the last process ended; they run again", len(interrupted)
                )
            self.store.purge(self.ttl_s)
            for record in self.store.undelivered_webhooks():
                self._send_webhook(record)
        self._feeder = asyncio.create_task(self._feed(), name="jobs-feeder")

    async def stop(self) -> None:
        """Stop feeding; jobs not ended stay queued or running in the store and run at the next start."""
        self._stopping = True
        tasks = [t for t in (self._feeder, *self._tasks.values(), *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._store is not None:
            self._store.close()
            self._store = None

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _feed(self) -> None:
        last_purge = time.monotonic()
        while True:
            service = self._service()
            room = self.max_inflight - len(self._tasks)
            if service is not None and room > 0 and self._accepting() and self._store is not None:
                for record in self.store.queued(room, exclude=set(self._tasks)):
                    self._tasks[record.id] = asyncio.create_task(self._run(service, record), name=f"job-{record.id}")
            if self._store is not None and time.monotonic() - last_purge > PURGE_EVERY_S:
                await asyncio.to_thread(self.store.purge, self.ttl_s)
                last_purge = time.monotonic()
            self._wake.clear()
            try:  # woken by a new job, a job that ended or a cancel; the timeout covers the model's loading
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except TimeoutError:
                pass

    # ---- one job ---------------------------------------------------------------------------------

    async def _run(self, service, record: JobRecord) -> None:
        job_id = record.id
        loop = asyncio.get_running_loop()
        control = StepControl(
            listener=lambda step, steps, preview: loop.call_soon_threadsafe(
                self._progress, job_id, step, steps, _preview_png(preview)
            ),
            preview_every=self.preview_every if record.preview else 0,
            on_start=lambda: loop.call_soon_threadsafe(self._started, job_id),
        )
        self._controls[job_id] = control
        try:
            while True:
                try:
                    outcome = await service.generate(record.spec, record.loras, record.strict, control=control)
                    break
                except (
                    QueueFull,
                    QueueTimeout,
                ):  # /generate's queue is full or slow: the job stays queued, tries again
                    if control.discarded:
                        return
                    await asyncio.sleep(RETRY_FULL_S)
            png = outcome.png
            await asyncio.to_thread(self.store.write_image, job_id, png)
            ended = self.store.transition(
                job_id,
                SUCCEEDED,
                result=self._to_result(outcome),
                step=control.step,
                steps=control.steps or record.steps,
            )
            if ended is None:  # canceled after its last step: the image is not kept
                self.store.image_path(job_id).unlink(missing_ok=True)
            else:
                self._ended(ended)
        except JobCanceled:
            pass  # `cancel` wrote the state and told the listeners
        except asyncio.CancelledError:
            raise  # the runner stops: the job stays queued or running in the store and runs at the next start
        except Exception as exc:  # the job failed as /generate would have: the same status and detail
            if isinstance(exc, ServiceUnavailable) and (self._stopping or not self._accepting()):
                return  # shutting down: as above
            if not isinstance(exc, ValueError | LookupError | ServiceUnavailable):
                logger.exception("job %s failed", job_id)
            ended = self.store.transition(job_id, FAILED, error=self._to_error(exc), step=control.step)
            if ended is not None:
                self._ended(ended)
        finally:
            self._tasks.pop(job_id, None)
            self._controls.pop(job_id, None)
            self.wake()

    def _started(self, job_id: str) -> None:
        record = self.store.transition(job_id, RUNNING)
        if record is None:  # canceled between its dispatch and the start of its loop
            control = self._controls.get(job_id)
            if control is not None:
                control.cancel()
            return
        self._publish(job_id, JobEvent(RUNNING, self.view(record)))

    def _progress(self, job_id: str, step: int, steps: int, preview: str | None) -> None:
        data = {"step": step, "steps": steps}
        if preview is not None:
            data["preview"] = preview
        self._publish(job_id, JobEvent("progress", data))

    def cancel(self, job_id: str) -> tuple[JobRecord, bool]:
        """Cancel a queued or running job: (the job, True); an ended job keeps its status: (the job, False).

        A queued job never starts; a running one stops at its next denoising step (its loop ends there
        unless other images share it) and its image is dropped. Raises UnknownJob.
        """
        control = self._controls.get(job_id)
        record = self.store.transition(job_id, CANCELED, step=control.step if control is not None else 0)
        if record is None:
            return self.store.get(job_id), False
        if control is not None:
            control.cancel()
        self._ended(record)
        self.wake()
        return record, True

    def _ended(self, record: JobRecord) -> None:
        self._publish(record.id, JobEvent(record.status, self.view(record)))
        if record.webhook_url:
            self._send_webhook(record)

    # ---- what clients see ------------------------------------------------------------------------

    def view(self, record: JobRecord, with_image: bool = True) -> dict:
        """The job as the API shows it (GET /jobs/{id}, the terminal event, the webhook's body)."""
        control = self._controls.get(record.id)
        step, steps = record.step, record.steps
        if record.status == RUNNING and control is not None and control.steps:
            step, steps = control.step, control.steps  # live; the store has the step only once it ended
        result = None
        if record.result is not None:
            result = dict(record.result)
            if with_image:
                path = self.store.image_path(record.id)
                result["image"] = base64.b64encode(path.read_bytes()).decode("ascii") if path.exists() else None
        return {
            "id": record.id,
            "status": record.status,
            "owner": record.owner,
            "progress": {"step": step, "steps": steps},
            "created_at": record.created_at,
            "started_at": record.started_at,
            "finished_at": record.finished_at,
            "result": result,
            "error": record.error,
            "webhook": None
            if record.webhook_url is None
            else {"url": record.webhook_url, "status": record.webhook_status, "attempts": record.webhook_attempts},
        }

    def pending(self) -> int:
        if self._store is None:
            return 0
        counts = self.store.counts()
        return counts[QUEUED] + counts[RUNNING]

    # ---- events ----------------------------------------------------------------------------------

    def subscribe(self, job_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.setdefault(job_id, set()).add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        subscribers = self._subscribers.get(job_id)
        if subscribers is not None:
            subscribers.discard(queue)
            if not subscribers:
                del self._subscribers[job_id]

    def _publish(self, job_id: str, event: JobEvent) -> None:
        for queue in self._subscribers.get(job_id, ()):
            queue.put_nowait(event)

    # ---- webhooks --------------------------------------------------------------------------------

    def _send_webhook(self, record: JobRecord) -> None:
        if self._secret is None:
            logger.error("job %s: webhook not sent, WEBHOOK_SECRET is not set", record.id)
            self.store.set_webhook(record.id, "failed", record.webhook_attempts)
            return
        body = json.dumps(self.view(record, with_image=True)).encode()

        def on_attempt(attempts: int, delivered: bool) -> None:
            final = delivered or attempts > webhooks.RETRIES
            status = "delivered" if delivered else ("failed" if final else "pending")
            self.store.set_webhook(record.id, status, attempts)

        task = asyncio.create_task(
            webhooks.deliver(record.webhook_url, body, self._secret, self._backoff_s, on_attempt),
            name=f"webhook-{record.id}",
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _preview_png(preview) -> str | None:
    """A preview array as a base64 PNG (encoded on the generation thread: at most 128x128, ~0.1 ms)."""
    if preview is None:
        return None
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(preview).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
