"""Batching: which queued jobs share a denoising loop (FIFO fairness, same set first, mixed sets when
that at least doubles the batch), and that a batched image is its single-request image.

Equality: each image of a batch is generated with its own seeded generator, so it is its
single-request image up to the float rounding of batched kernels. The bound is 1 level of 255 per
pixel (what a PNG can show), checked on the float images; exact where the arithmetic is the same.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from app.errors import ClientGone
from app.jobs import ActiveAdapter, GenerationJob, GenerationSpec
from app.queueing import GenerationQueue
from tests.conftest import PROMPT, SIZE, STEPS, small_request, with_lora_b_biases

ONE_LEVEL = 1 / 255


# ---- the queue's choice of batches (a scripted worker, no model) ----------------------------------------


WEIGHTS: dict[str, object] = {}  # one resident weights object per LoRA, as the LoRA manager hands out


def job(name: str, lora: str | None = None, size: int = 64) -> GenerationJob:
    adapters = (ActiveAdapter(lora, WEIGHTS.setdefault(lora, object()), 0.8),) if lora else ()
    return GenerationJob(GenerationSpec(name, None, size, size, 2, 7.5, 0), adapters)


class Worker:
    def __init__(self):
        self.started, self.released = threading.Event(), threading.Event()
        self.batches: list[list[str]] = []

    def __call__(self, jobs, on_step):
        names = [j.spec.prompt for j in jobs]
        self.batches.append(names)
        if "hold" in names:
            self.started.set()
            self.released.wait(10)
        return names


def run_queue(jobs: list[GenerationJob], **queue_args) -> list[list[str]]:
    """Hold the worker, queue `jobs` in order, release: the batches the worker formed after the hold."""

    async def scenario():
        worker = Worker()
        queue = GenerationQueue(worker, max_waiting=32, timeout_s=10, **queue_args)
        queue.reserve()
        held = asyncio.ensure_future(queue.submit(job("hold")))
        await asyncio.to_thread(worker.started.wait, 5)
        waiting = []
        for j in jobs:
            queue.reserve()
            waiting.append(asyncio.ensure_future(queue.submit(j)))
        await asyncio.sleep(0.05)
        worker.released.set()
        results = [(await w)[0] for w in [held, *waiting]]
        queue.shutdown()
        assert results == ["hold", *(j.spec.prompt for j in jobs)]  # every job got its own image
        return worker.batches[1:]

    return asyncio.run(scenario())


def test_compatible_jobs_share_a_loop_and_an_older_incompatible_one_goes_next():
    jobs = [job("a1", "a"), job("x", "a", size=128), *(job(f"a{i}", "a") for i in range(2, 6))]

    batches = run_queue(jobs, batch_max_size=4)

    # x (another size) waits only for the loop of the older a1, then goes before a5.
    assert batches == [["a1", "a2", "a3", "a4"], ["x"], ["a5"]]


def test_sets_are_mixed_only_when_that_at_least_doubles_the_batch():
    mixed = run_queue([job("b1", "b"), job("c1", "c"), job("d1", "d"), job("b2", "b")], batch_max_size=4)
    same_first = run_queue([job("b1", "b"), job("b2", "b"), job("b3", "b"), job("c1", "c")], batch_max_size=4)
    no_mixing = run_queue([job("b1", "b"), job("c1", "c"), job("d1", "d"), job("b2", "b")], batch_max_size=4,
                          mixed=False)  # fmt: skip

    assert mixed == [["b1", "c1", "d1", "b2"]]  # b alone would make 2: mixing makes 4
    assert same_first == [["b1", "b2", "b3"], ["c1"]]  # b alone makes 3: mixing would make 4 < 6
    assert no_mixing == [["b1", "b2"], ["c1"], ["d1"]]


def test_batch_max_size_one_runs_every_job_alone():
    assert run_queue([job("a1", "a"), job("a2", "a")], batch_max_size=1) == [["a1"], ["a2"]]


def test_the_worker_waits_batch_wait_ms_for_a_companion_on_its_way():
    async def scenario():
        worker = Worker()
        queue = GenerationQueue(worker, max_waiting=8, timeout_s=10, batch_max_size=4, batch_wait_ms=400)
        queue.reserve()
        queue.reserve()  # a second request is on its way (e.g. still loading its LoRA)
        first = asyncio.ensure_future(queue.submit(job("a1", "a")))
        await asyncio.sleep(0.1)  # the worker has a1 and waits for more
        second = asyncio.ensure_future(queue.submit(job("a2", "a")))
        await asyncio.gather(first, second)
        queue.shutdown()
        return worker.batches

    assert asyncio.run(scenario()) == [["a1", "a2"]]


def test_a_lone_request_does_not_wait_for_companions():
    """A sequential client gains nothing from the batch window: its request starts at once."""

    async def scenario():
        worker = Worker()
        queue = GenerationQueue(worker, max_waiting=8, timeout_s=60, batch_max_size=4, batch_wait_ms=10_000)
        for name in ("a1", "a2"):  # one after the other, as a sequential client sends them
            queue.reserve()
            # Far below the 10 s window: a worker that waited for companions would time out here.
            await asyncio.wait_for(queue.submit(job(name, "a")), timeout=5)
        queue.shutdown()
        return worker.batches

    assert asyncio.run(scenario()) == [["a1"], ["a2"]]


def test_a_client_that_leaves_is_dropped_without_harming_its_batch_mates():
    async def scenario():
        worker = Worker()
        queue = GenerationQueue(worker, max_waiting=8, timeout_s=10, batch_max_size=4)
        queue.reserve()
        held = asyncio.ensure_future(queue.submit(job("hold")))
        await asyncio.to_thread(worker.started.wait, 5)

        async def gone() -> bool:
            return True

        queue.reserve()
        stays = asyncio.ensure_future(queue.submit(job("stays", "a")))
        queue.reserve()
        with pytest.raises(ClientGone):
            await queue.submit(job("leaves", "a"), disconnected=gone)
        worker.released.set()
        await held
        result, _ = await stays
        queue.shutdown()
        assert queue.depth == 0
        return result, worker.batches

    result, batches = asyncio.run(scenario())
    assert result == "stays" and batches[1:] == [["stays"]]


# ---- the engine: a batched image is its single image ---------------------------------------------------


def spec(prompt: str, seed: int, scheduler: str = "pndm") -> GenerationSpec:
    return GenerationSpec(prompt, None, SIZE, SIZE, STEPS, 7.5, seed, scheduler=scheduler)


@pytest.fixture(scope="module")
def adapters(engine, make_lora, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch-loras")
    a = make_lora(folder / "a.safetensors", seed=71)
    b = make_lora(folder / "b.safetensors", key_format="kohya", convolutions=True, alpha=2.0, seed=72)
    return {"a": engine.load_adapter(a), "b": engine.load_adapter(b)}


def singles_and_batch(engine, jobs):
    singles = [engine.generate(j, output_type="np").image for j in jobs]
    batched = engine.generate_batch(jobs, output_type="np")
    return singles, batched


def test_a_same_set_batch_equals_the_single_images(engine, adapters):
    lora = (ActiveAdapter("a", adapters["a"], 0.8),)
    jobs = [GenerationJob(spec(p, s), lora) for p, s in [(PROMPT, 1), ("a blue chair", 2), (PROMPT, 3)]]

    singles, batched = singles_and_batch(engine, jobs)

    assert [r.batch_size for r in batched] == [3, 3, 3]
    for single, result in zip(singles, batched, strict=True):
        assert np.abs(single - result.image).max() <= ONE_LEVEL
    assert np.abs(singles[0] - singles[2]).max() > 0.05  # other seeds: other images


def test_a_mixed_batch_equals_the_single_images(engine, adapters):
    sets = [
        (ActiveAdapter("a", adapters["a"], 0.8),),
        (ActiveAdapter("b", adapters["b"], 0.6),),
        (),  # the base model
        (ActiveAdapter("a", adapters["a"], 0.3), ActiveAdapter("b", adapters["b"], 0.5)),
    ]
    jobs = [GenerationJob(spec(PROMPT, 5 + i), lora) for i, lora in enumerate(sets)]

    singles, batched = singles_and_batch(engine, jobs)
    base_again = engine.generate(GenerationJob(spec(PROMPT, 7)), output_type="np").image

    for single, result in zip(singles, batched, strict=True):
        assert np.abs(single - result.image).max() <= ONE_LEVEL
    np.testing.assert_array_equal(base_again, singles[2])  # the base weights came back after the batch


def test_two_versions_of_a_file_under_one_key_are_two_sets_in_a_batch(engine, adapters):
    # The file behind key "acme" was replaced between two requests: each image keeps the weights it acquired.
    jobs = [GenerationJob(spec(PROMPT, 31 + i), (ActiveAdapter("acme", adapters[name], 0.8),)) for i, name in
            enumerate("ab")]  # fmt: skip

    singles, batched = singles_and_batch(engine, jobs)

    for single, result in zip(singles, batched, strict=True):
        assert np.abs(single - result.image).max() <= ONE_LEVEL


def test_lora_b_biases_are_applied_alike_merged_and_per_image(engine, make_lora, tmp_path, adapters):
    path = with_lora_b_biases(make_lora(tmp_path / "biased.safetensors", seed=73), engine._targets)
    biased = engine.load_adapter(path)
    assert sum(layer.up_bias is not None for layer in biased.layers) > 0
    sets = [(ActiveAdapter("biased", biased, 0.9),), (ActiveAdapter("a", adapters["a"], 0.8),), ()]
    jobs = [GenerationJob(spec(PROMPT, 21 + i), lora) for i, lora in enumerate(sets)]

    singles, batched = singles_and_batch(engine, jobs)
    base_again = engine.generate(jobs[2], output_type="np").image

    for single, result in zip(singles, batched, strict=True):
        assert np.abs(single - result.image).max() <= ONE_LEVEL
    np.testing.assert_array_equal(base_again, singles[2])  # the pristine biases stayed pristine


def test_a_batch_with_a_random_sampler_uses_each_images_own_generator(engine, adapters):
    lora = (ActiveAdapter("b", adapters["b"], 0.7),)
    jobs = [GenerationJob(spec(PROMPT, seed, scheduler="euler_a"), lora) for seed in (11, 12)]

    singles, batched = singles_and_batch(engine, jobs)

    for single, result in zip(singles, batched, strict=True):
        assert np.abs(single - result.image).max() <= ONE_LEVEL


# ---- over HTTP ----------------------------------------------------------------------------------


def test_batched_requests_report_their_batch_size_and_metrics_count_loops(make_client, lora_root, make_brand):
    for i, brand in enumerate(["a", "b"]):
        make_brand(lora_root, brand, seed=80 + i)
    with make_client(lora_root, batch_max_size=4, batch_wait_ms=200, max_queue_size=16) as client:
        serial = client.post("/generate", json=small_request(seed=3, brand_id="a")).json()
        bodies: list[dict] = []

        def post(fields):
            bodies.append(client.post("/generate", json=small_request(**fields)).json())

        threads = [
            threading.Thread(target=post, args=(f,))
            for f in ({"seed": 3, "brand_id": "a"}, {"seed": 4, "brand_id": "b"}, {"seed": 5}, {"seed": 6})
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        metrics = client.get("/metrics").text

    assert serial["batch_size"] == 1 and len(bodies) == 4
    assert max(b["batch_size"] for b in bodies) > 1
    again = next(b for b in bodies if b["seed"] == 3)
    from tests.conftest import pixels, png_bytes

    assert np.abs(pixels(png_bytes(again["image"])) - pixels(png_bytes(serial["image"]))).max() <= 1
    assert "generation_batch_size_bucket" in metrics
    count = float(next(x.split()[1] for x in metrics.splitlines() if x.startswith("generation_batch_size_count")))
    total = float(next(x.split()[1] for x in metrics.splitlines() if x.startswith("generation_batch_size_sum")))
    assert total == 5 and count < 5  # five images, in fewer loops
