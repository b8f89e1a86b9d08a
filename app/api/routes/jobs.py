"""Jobs: POST /jobs, GET /jobs, GET /jobs/{id}, /jobs/{id}/image, /jobs/{id}/events, DELETE /jobs/{id}."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from app.access import Caller
from app.api.deps import CallerDep, ServiceDep, SettingsDep, StateDep
from app.api.routes.generate import lora_specs
from app.api.schemas import JobCancelPublic, JobListPublic, JobPublic, JobRequest
from app.errors import ServiceUnavailable
from app.jobqueue.runner import JobEvent, JobRunner
from app.jobqueue.store import ENDED, EVERYONE, QUEUED, RUNNING, Everyone, NoJobImage
from app.jobqueue.webhooks import check_webhook_url
from app.service import draw_seed

router = APIRouter(tags=["jobs"])

KEEPALIVE_S = 15.0


def get_runner(state: StateDep) -> JobRunner:
    if state.jobs is None:
        raise ServiceUnavailable("the job runner is not started")
    return state.jobs


RunnerDep = Annotated[JobRunner, Depends(get_runner)]


def owner_of(caller: Caller) -> str | None:
    """The job's `owner`: the submitting key's name (None without a key)."""
    return None if caller.anonymous else caller.name


def visible_to(caller: Caller) -> str | None | Everyone:
    """Whose jobs a caller sees: its own; an admin key (or a service without keys) everyone's."""
    return EVERYONE if caller.is_admin else owner_of(caller)


@router.post("/jobs", status_code=202, response_model=JobPublic)
async def submit_job(
    body: JobRequest,
    service: ServiceDep,
    settings: SettingsDep,
    runner: RunnerDep,
    caller: CallerDep,
) -> JSONResponse:
    # Validated exactly as /generate, before anything is stored; the seed is drawn now and stored.
    specs = lora_specs(body)
    service.check_limits(body.width, body.height, body.num_inference_steps, len(specs))
    spec = body.spec(body.seed if body.seed is not None else draw_seed())
    service.check_edit(spec)
    if body.webhook_url is not None:
        check_webhook_url(body.webhook_url, settings.webhook_hosts, settings.webhook_secret is not None)
    # The caller's brands (403) and quota (429: the image is paid for now), as /generate checks them; the
    # job then runs as the service's own work.
    service.admit(specs)
    record = runner.store.add(
        spec, specs, body.strict, body.preview, body.webhook_url, owner_of(caller), settings.jobs_max_pending
    )
    runner.wake()
    return JSONResponse(runner.view(record), status_code=202, headers={"Location": f"/jobs/{record.id}"})


@router.get("/jobs", response_model=JobListPublic)
def list_jobs(
    runner: RunnerDep,
    caller: CallerDep,
    status: Literal["queued", "running", "succeeded", "failed", "canceled"] | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict:
    """Jobs, newest first (without `result.image`: GET /jobs/{id} or /jobs/{id}/image has it)."""
    records = runner.store.list(status, limit, owner=visible_to(caller))
    return {"data": [runner.view(r, with_image=False) for r in records], "count": len(records)}


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: str, runner: RunnerDep, caller: CallerDep) -> dict:
    return runner.view(runner.store.get(job_id, visible_to(caller)))


@router.get("/jobs/{job_id}/image", response_class=Response, responses={200: {"content": {"image/png": {}}}})
def get_job_image(job_id: str, runner: RunnerDep, caller: CallerDep) -> FileResponse:
    record = runner.store.get(job_id, visible_to(caller))
    path = runner.store.image_path(job_id)
    if record.status != "succeeded" or not path.exists():
        raise NoJobImage(job_id, record.status)
    return FileResponse(path, media_type="image/png")


@router.delete("/jobs/{job_id}", response_model=JobCancelPublic)
async def cancel_job(job_id: str, runner: RunnerDep, caller: CallerDep) -> dict:
    runner.store.get(job_id, visible_to(caller))  # another caller's job: 404
    record, canceled = runner.cancel(job_id)
    message = "canceled" if canceled else f"the job had already ended ({record.status}); it keeps its status"
    return {**runner.view(record), "canceled": canceled, "message": message}


@router.get(
    "/jobs/{job_id}/events", response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}}
)
async def job_events(job_id: str, runner: RunnerDep, caller: CallerDep) -> StreamingResponse:
    """Server-Sent Events: `queued`, `running`, one `progress` per step, then one terminal event
    (`succeeded`, `failed` or `canceled`, data: the job); the stream closes after it."""
    runner.store.get(job_id, visible_to(caller))  # 404 before the stream starts
    return StreamingResponse(
        _event_stream(runner, job_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _event_stream(runner: JobRunner, job_id: str) -> AsyncIterator[str]:
    events = runner.subscribe(job_id)  # before reading the state, so that nothing falls between the two
    try:
        record = runner.store.get(job_id)
        sent: set[str] = set()
        last_step = 0
        if record.status in ENDED:
            yield _sse(JobEvent(record.status, runner.view(record)))
            return
        # The state the job is in now: `queued` while it waits, `running` once it runs (a client that
        # connects while it runs does not hear of a wait that is over).
        yield _sse(JobEvent(record.status, runner.view(record)))
        sent.add(QUEUED)
        if record.status == RUNNING:
            sent.add(RUNNING)
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if event.name in (QUEUED, RUNNING):
                if event.name in sent:
                    continue
                sent.add(event.name)
            elif event.name == "progress":
                if event.data["step"] <= last_step:
                    continue
                last_step = event.data["step"]
            yield _sse(event)
            if event.terminal:
                return
    finally:
        runner.unsubscribe(job_id, events)


def _sse(event: JobEvent) -> str:
    return f"event: {event.name}\ndata: {json.dumps(event.data, separators=(',', ':'))}\n\n"
