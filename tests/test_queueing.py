"""The generation queue: arrival order, a bounded number of waiting places, and places given back by
requests that time out or whose client left; and an out-of-memory generation answered with 503."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from app.queueing import ClientGone, GenerationQueue, QueueFull, QueueTimeout
from tests.conftest import small_request


def _blocker():
    """A job that holds the worker until released, so the test controls who is waiting."""
    started, release = threading.Event(), threading.Event()

    def job():
        started.set()
        release.wait(10)
        return "held"

    return job, started, release


def test_jobs_run_in_arrival_order_and_the_queue_refuses_beyond_its_places():
    async def scenario():
        queue = GenerationQueue(max_waiting=3, timeout_s=10)
        hold, started, release = _blocker()
        queue.reserve()
        running = asyncio.ensure_future(queue.run(hold))
        await asyncio.to_thread(started.wait, 5)
        order: list[int] = []
        waiting = []
        for i in range(3):
            queue.reserve()
            waiting.append(asyncio.ensure_future(queue.run(lambda i=i: order.append(i) or i)))
        await asyncio.sleep(0.05)
        assert queue.depth == 4  # one running, three waiting
        with pytest.raises(QueueFull) as refused:
            queue.reserve()
        assert refused.value.retry_after_s >= 1
        release.set()
        results = [(await job)[0] for job in [running, *waiting]]
        assert results == ["held", 0, 1, 2]
        assert order == [0, 1, 2]
        assert queue.depth == 0
        queue.reserve()  # room again
        queue.release_reservation()
        queue.shutdown()

    asyncio.run(scenario())


def test_a_request_that_waits_too_long_times_out_and_frees_its_place():
    async def scenario():
        queue = GenerationQueue(max_waiting=1, timeout_s=0.3)
        hold, started, release = _blocker()
        queue.reserve()
        running = asyncio.ensure_future(queue.run(hold))
        await asyncio.to_thread(started.wait, 5)
        ran = []
        queue.reserve()
        with pytest.raises(QueueTimeout):
            await queue.run(lambda: ran.append(1))
        queue.reserve()  # the timed-out request's place is free again
        queue.release_reservation()
        release.set()
        await running
        await asyncio.sleep(0.05)
        assert ran == []  # the abandoned job never ran
        queue.shutdown()

    asyncio.run(scenario())


def test_a_client_that_disconnects_while_queued_frees_its_place():
    async def scenario():
        queue = GenerationQueue(max_waiting=1, timeout_s=30)
        hold, started, release = _blocker()
        queue.reserve()
        running = asyncio.ensure_future(queue.run(hold))
        await asyncio.to_thread(started.wait, 5)
        ran = []

        async def gone() -> bool:
            return True

        queue.reserve()
        with pytest.raises(ClientGone):
            await queue.run(lambda: ran.append(1), disconnected=gone)
        queue.reserve()  # its place was given back
        queue.release_reservation()
        release.set()
        await running
        await asyncio.sleep(0.05)
        assert ran == []
        queue.shutdown()

    asyncio.run(scenario())


def test_out_of_memory_during_generation_is_503_and_the_service_keeps_serving(make_client, lora_root, monkeypatch):
    with make_client(lora_root) as client:
        engine = client.app.state.service_state.engine
        real_run = engine._run_pipeline
        calls = []

        def run_out_of_memory(spec, output_type):
            calls.append(spec)
            if len(calls) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_run(spec, output_type)

        monkeypatch.setattr(engine, "_run_pipeline", run_out_of_memory)
        failed = client.post("/generate", json=small_request())
        assert failed.status_code == 503
        assert "out of memory" in failed.json()["detail"]
        assert failed.headers.get("retry-after")
        again = client.post("/generate", json=small_request())
        assert again.status_code == 200
        assert len(calls) == 2
