"""The engine's step hook (app/jobs.py StepControl): progress per step, previews, and the two ways to stop."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from app.errors import JobCanceled
from app.jobs import GenerationJob, GenerationSpec, StepControl
from app.queueing import GenerationQueue
from tests.conftest import PROMPT, SIZE

STEPS = 6


def job_spec(seed: int = 7, steps: int = STEPS, scheduler: str = "euler") -> GenerationSpec:
    return GenerationSpec(PROMPT, None, SIZE, SIZE, steps, 7.5, seed, scheduler=scheduler)


def test_every_step_is_reported_with_the_steps_the_loop_runs(engine):
    seen = []
    control = StepControl(lambda step, steps, preview: seen.append((step, steps, preview)), preview_every=2)
    plain = engine.generate(GenerationJob(job_spec()), output_type="np").image
    watched = engine.generate(GenerationJob(job_spec(), control=control), output_type="np")
    assert [(step, steps) for step, steps, _ in seen] == [(i, STEPS) for i in range(1, STEPS + 1)]
    assert [step for step, _, preview in seen if preview is not None] == [2, 4, 6]
    preview = seen[-1][2]
    assert preview.dtype == np.uint8 and preview.shape == (SIZE // 8, SIZE // 8, 3)
    assert watched.stopped_at is None
    np.testing.assert_array_equal(watched.image, plain)  # watching changes nothing


def test_finish_early_decodes_the_latents_reached(engine):
    control = StepControl(lambda step, steps, preview: step == 2 and control.finish_early())
    full = engine.generate(GenerationJob(job_spec()), output_type="np").image
    early = engine.generate(GenerationJob(job_spec(), control=control), output_type="np")
    assert early.stopped_at == 2 and control.step == 2
    assert early.image.shape == full.shape and not np.array_equal(early.image, full)


def test_a_discarded_image_ends_its_loop_and_only_a_shared_loop_goes_on(engine):
    control = StepControl(lambda step, steps, preview: step == 2 and control.cancel())
    [alone] = engine.generate_batch([GenerationJob(job_spec(), control=control)], output_type="np")
    assert alone.image is None and alone.stopped_at == 2 and control.step == 2

    other = StepControl()
    control = StepControl(lambda step, steps, preview: step == 2 and control.cancel())
    jobs = [GenerationJob(job_spec(1), control=control), GenerationJob(job_spec(2), control=other)]
    shared = engine.generate_batch(jobs, output_type="np")
    assert other.step == STEPS and shared[1].image is not None and shared[0].stopped_at is None


def test_the_queue_fails_a_canceled_job_and_never_starts_a_canceled_waiting_one(engine):
    asyncio.run(_queue_scenario(engine))


async def _queue_scenario(engine):
    ran = []

    def execute(jobs, on_step):
        ran.append([job.spec.seed for job in jobs])
        return engine.generate_batch(jobs, output_type="np", on_step=on_step)

    queue = GenerationQueue(execute, max_waiting=4, timeout_s=60)
    try:
        control = StepControl()
        control.cancel()
        queue.reserve()
        with pytest.raises(JobCanceled):
            await queue.submit(GenerationJob(job_spec(3), control=control))
        assert ran == [] and queue.depth == 0

        assert not control.started
        running = StepControl(lambda step, steps, preview: step == 1 and running.cancel())
        queue.reserve()
        with pytest.raises(JobCanceled):
            await queue.submit(GenerationJob(job_spec(4), control=running))
        assert ran == [[4]] and running.started and running.step == 1 and queue.depth == 0
    finally:
        queue.shutdown()
