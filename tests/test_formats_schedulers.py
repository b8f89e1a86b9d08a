"""the `scheduler` field: every sampler equals diffusers' own pipeline with that scheduler."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from app.engine.schedulers import SCHEDULER_CLASSES
from app.samplers import SCHEDULER_NAMES
from tests.conftest import PROMPT, SIZE, STEPS, generate, load_reference_pipe, pixels, png_bytes, small_request


@pytest.fixture(scope="module")
def api(make_client, tmp_path_factory):
    with make_client(tmp_path_factory.mktemp("sched-loras")) as c:
        yield c


@pytest.fixture(scope="module")
def diffusers_pipe(model_dir):
    """diffusers' pipeline of this module only (its scheduler is swapped per test)."""
    return load_reference_pipe(model_dir)


def diffusers_image(pipe, name: str, seed: int, steps: int = STEPS) -> np.ndarray:
    if not hasattr(pipe, "own_scheduler"):  # the model's own scheduler and config, before any swap
        pipe.own_scheduler = (type(pipe.scheduler), pipe.scheduler.config)
    own, config = pipe.own_scheduler
    cls, extra = SCHEDULER_CLASSES[name]
    pipe.scheduler = (cls or own).from_config(config, **extra)
    with torch.inference_mode():
        image = pipe(
            prompt=PROMPT, width=SIZE, height=SIZE, num_inference_steps=steps, guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
        ).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)



@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_each_scheduler_equals_diffusers_with_that_scheduler(api, diffusers_pipe, name):
    body = generate(api, seed=11, scheduler=name, num_inference_steps=3)

    np.testing.assert_array_equal(pixels(png_bytes(body["image"])), diffusers_image(diffusers_pipe, name, 11, 3))


def test_dpmpp_2m_karras_is_the_multistep_solver_with_karras_sigmas():
    cls, extra = SCHEDULER_CLASSES["dpmpp_2m_karras"]
    assert cls.__name__ == "DPMSolverMultistepScheduler" and extra == {"use_karras_sigmas": True}
    assert SCHEDULER_CLASSES["euler_a"][0].__name__ == "EulerAncestralDiscreteScheduler"
    assert SCHEDULER_CLASSES["lms"][0].__name__ == "LMSDiscreteScheduler"
    assert SCHEDULER_CLASSES["unipc"][0].__name__ == "UniPCMultistepScheduler"


def test_schedulers_give_different_images(api):
    images = {name: generate(api, seed=5, scheduler=name, num_inference_steps=3)["image"] for name in SCHEDULER_NAMES}

    for a, b in itertools.combinations(SCHEDULER_NAMES, 2):
        assert images[a] != images[b], f"{a} and {b} gave the same image"
        diff = np.abs(pixels(png_bytes(images[a])) - pixels(png_bytes(images[b])))
        assert diff.max() > 0, f"{a} and {b} gave the same pixels"


def test_default_is_pndm_and_a_sampler_does_not_leak_into_the_next_request(api, reference_pipe):
    default = generate(api, seed=9)
    generate(api, seed=9, scheduler="dpmpp_2m")  # a multistep solver keeps history in its scheduler
    again = generate(api, seed=9)
    explicit = generate(api, seed=9, scheduler="pndm")

    assert default["image"] == again["image"]
    assert pixels(png_bytes(default["image"])).tolist() == pixels(png_bytes(explicit["image"])).tolist()
    assert type(reference_pipe.scheduler).__name__ == "PNDMScheduler"  # the model's own


def test_unknown_scheduler_is_422_listing_the_allowed_ones(api):
    response = api.post("/generate", json=small_request(scheduler="heun"))

    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "scheduler"]
    assert all(name in error["msg"] for name in SCHEDULER_NAMES), error["msg"]


def test_service_info_lists_the_schedulers(api):
    assert api.get("/").json()["schedulers"] == list(SCHEDULER_NAMES)


def test_ab_test_takes_a_scheduler_and_its_images_equal_generate(api):
    ab = api.post("/ab-test", json={**small_request(seed=4, scheduler="euler_a"), "variants": [{"lora_configs": []}]})
    assert ab.status_code == 200, ab.text

    assert ab.json()["variants"][0]["image"] == generate(api, seed=4, scheduler="euler_a")["image"]
