"""The generation queue: arrival order, a bounded number of waiting places, and places given back by
requests that time out or whose client left; and an out-of-memory generation answered with 503."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from app.errors import ClientGone, QueueFull, QueueTimeout
from app.jobs import GenerationJob, GenerationSpec
from app.queueing import GenerationQueue
from tests.conftest import small_request


class ScriptedWorker:
    """An executor for the queue: a job whose prompt is "hold" keeps the worker until `release`."""

    def __init__(self):
        self.started, self.released = threading.Event(), threading.Event()
        self.ran: list[str] = []
        self.batches: list[list[str]] = []

    def __call__(self, jobs: list[GenerationJob], on_step) -> list[str]:
        self.batches.append([job.spec.prompt for job in jobs])
        if any(job.spec.prompt == "hold" for job in jobs):
            self.started.set()
            self.released.wait(10)
        self.ran += [job.spec.prompt for job in jobs]
        return [job.spec.prompt for job in jobs]


def job(prompt: str) -> GenerationJob:
    return GenerationJob(GenerationSpec(prompt, None, 64, 64, 1, 1.0, 0))


async def hold_the_worker(queue: GenerationQueue, worker: ScriptedWorker):
    queue.reserve()
    running = asyncio.ensure_future(queue.submit(job("hold")))
    await asyncio.to_thread(worker.started.wait, 5)
    return running


def test_jobs_run_in_arrival_order_and_the_queue_refuses_beyond_its_places():
    async def scenario():
        worker = ScriptedWorker()
        queue = GenerationQueue(worker, max_waiting=3, timeout_s=10)
        running = await hold_the_worker(queue, worker)
        waiting = []
        for i in range(3):
            queue.reserve()
            waiting.append(asyncio.ensure_future(queue.submit(job(str(i)))))
        await asyncio.sleep(0.05)
        assert queue.depth == 4  # one running, three waiting
        with pytest.raises(QueueFull) as refused:
            queue.reserve()
        assert refused.value.retry_after_s >= 1
        worker.released.set()
        results = [(await j)[0] for j in [running, *waiting]]
        assert results == ["hold", "0", "1", "2"]
        assert worker.ran == ["hold", "0", "1", "2"]
        assert queue.depth == 0
        queue.reserve()  # room again
        queue.release_reservation()
        queue.shutdown()

    asyncio.run(scenario())


def test_a_request_that_waits_too_long_times_out_and_frees_its_place():
    async def scenario():
        worker = ScriptedWorker()
        queue = GenerationQueue(worker, max_waiting=1, timeout_s=0.3)
        running = await hold_the_worker(queue, worker)
        queue.reserve()
        with pytest.raises(QueueTimeout):
            await queue.submit(job("late"))
        queue.reserve()  # the timed-out request's place is free again
        worker.released.set()
        await running
        await queue.submit(job("after"))  # in arrival order: the abandoned job would have run before it
        assert worker.ran == ["hold", "after"]  # the abandoned job never ran
        queue.shutdown()

    asyncio.run(scenario())


def test_a_client_that_disconnects_while_queued_frees_its_place():
    async def scenario():
        worker = ScriptedWorker()
        queue = GenerationQueue(worker, max_waiting=1, timeout_s=30)
        running = await hold_the_worker(queue, worker)

        async def gone() -> bool:
            return True

        queue.reserve()
        with pytest.raises(ClientGone):
            await queue.submit(job("gone"), disconnected=gone)
        queue.reserve()  # its place was given back
        worker.released.set()
        await running
        await queue.submit(job("after"))  # in arrival order: the dropped job would have run before it
        assert worker.ran == ["hold", "after"]
        queue.shutdown()

    asyncio.run(scenario())


def test_the_watchdog_reports_a_worker_without_progress_while_work_waits():
    async def scenario():
        worker = ScriptedWorker()
        queue = GenerationQueue(worker, max_waiting=2, timeout_s=30, watchdog_s=0.2)
        assert queue.stalled_for() is None
        running = await hold_the_worker(queue, worker)
        for _ in range(600):  # the stall is reported once watchdog_s has passed (a 30 s guard against a hang)
            if queue.stalled_for() is not None:
                break
            await asyncio.sleep(0.05)
        assert queue.stalled_for() is not None and queue.stalled_for() > 0.2
        worker.released.set()
        await running
        assert queue.stalled_for() is None  # idle again: no work, no stall
        await asyncio.sleep(0.5)
        assert queue.stalled_for() is None  # idle time is not a stall
        queue.shutdown()

    asyncio.run(scenario())


def test_out_of_memory_during_generation_is_503_and_the_service_keeps_serving(make_client, lora_root, monkeypatch):
    with make_client(lora_root) as client:
        engine = client.app.state.service_state.engine
        real_run = engine._run_pipeline
        calls = []

        def run_out_of_memory(specs, output_type, on_step, embeddings=None):
            calls.append(specs)
            if len(calls) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_run(specs, output_type, on_step, embeddings)

        monkeypatch.setattr(engine, "_run_pipeline", run_out_of_memory)
        failed = client.post("/generate", json=small_request())
        assert failed.status_code == 503
        assert "out of memory" in failed.json()["detail"]
        assert failed.headers.get("retry-after")
        again = client.post("/generate", json=small_request())
        assert again.status_code == 200
        assert len(calls) == 2
