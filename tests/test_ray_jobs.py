"""A job's StepControl through the Ray ingress's service (no cluster: a stand-in for Ray's handle, which
we do not own): the job starts when its request goes to a replica, and a cancel cancels that request."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")

from app.config import Settings  # noqa: E402
from app.errors import JobCanceled  # noqa: E402
from app.jobs import GenerationSpec, StepControl  # noqa: E402
from app.lora.registry import LoraRegistry  # noqa: E402
from app.serve.remote import RemoteGenerationService  # noqa: E402


class PendingResponse:
    """Ray's DeploymentResponse as the service uses it: awaitable, cancellable. It never answers."""

    def __init__(self):
        self.canceled = asyncio.Event()

    def __await__(self):
        return self.canceled.wait().__await__()

    def __aiter__(self):  # a streaming call (`generate_stream`, a job's): no step ever comes either
        return self

    async def __anext__(self):
        await self.canceled.wait()
        raise StopAsyncIteration

    def cancel(self):
        self.canceled.set()


class Handle:
    def __init__(self):
        self.responses: list[PendingResponse] = []
        self.generate = self.generate_stream = self

    def options(self, **_):
        return self

    def remote(self, *args, **kwargs):
        self.responses.append(PendingResponse())
        return self.responses[-1]


def test_a_canceled_job_cancels_its_replica_request(tmp_path):
    handle = Handle()
    service = RemoteGenerationService(
        Settings(lora_base_dir=tmp_path, ray_routing="random"), LoraRegistry(tmp_path), handle
    )
    control = StepControl()

    async def scenario():
        job = asyncio.ensure_future(
            service.generate(GenerationSpec("a cup", None, 64, 64, 2, 7.5, 1), [], control=control)
        )
        while not handle.responses:
            await asyncio.sleep(0.01)
        assert control.started and not job.done()
        control.cancel()
        with pytest.raises(JobCanceled):
            await asyncio.wait_for(job, 30)
        assert handle.responses[0].canceled.is_set()

    asyncio.run(scenario())
