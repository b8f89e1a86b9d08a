"""AUTOMATIC1111's `/sdapi/v1`, driven with the `webuiapi` client (0.9.17) against a real uvicorn server.

Every image is /generate's image for the same settings (the A1111 layer only translates), img2img is
diffusers' own img2img, inpainting keeps the outside of the (blurred) mask pixel for pixel, and every
field we cannot honour is a 422 that names it.
"""

from __future__ import annotations

import base64
import io
import threading

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image, ImageFilter

from app.infotext import PNG_TEXT_KEY
from tests.conftest import GUIDANCE, SIZE, ServerProcess, wait_for
from tests.test_editing import init_image, square_mask

STEPS = 4
PROMPT = "a red coffee cup <lora:acme:0.7>"


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_brand):
    work = tmp_path_factory.mktemp("a1111")
    make_brand(work / "loras", "acme", seed=5)
    (work / "loras" / "acme" / "metadata.json").write_text('{"type": "style", "trigger_words": ["acme"]}')
    server = ServerProcess(work, {"BATCH_MAX_SIZE": "4"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler a", steps=STEPS)


@pytest.fixture(scope="module")
def img2img_reference(reference_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**reference_pipe.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_scheduler = type(pipe.scheduler), pipe.scheduler.config
    return pipe


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_txt2img_batch_equals_generate_with_seeds_s_and_s_plus_1(api, server):
    result = api.txt2img(prompt=PROMPT, seed=41, batch_size=2, width=SIZE, height=SIZE, cfg_scale=GUIDANCE)

    assert result.info["all_seeds"] == [41, 42] and result.info["seed"] == 41
    assert result.info["sampler_name"] == "Euler a" and len(result.info["infotexts"]) == 2
    assert len(result.images) == 2
    for seed, image in zip((41, 42), result.images, strict=True):
        body = {"prompt": PROMPT, "seed": seed, "width": SIZE, "height": SIZE, "num_inference_steps": STEPS,
                "guidance_scale": GUIDANCE, "scheduler": "euler_a"}  # fmt: skip
        ours = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()
        expected = Image.open(io.BytesIO(base64.b64decode(ours["image"])))
        np.testing.assert_array_equal(array(image), array(expected))
        assert image.info[PNG_TEXT_KEY] == expected.info[PNG_TEXT_KEY]
        assert "Lora hashes" in image.info[PNG_TEXT_KEY] and ours["loras"][0]["brand_id"] == "acme"
    assert np.abs(array(result.images[0]) - array(result.images[1])).max() > 0


def test_img2img_equals_diffusers_img2img(api, img2img_reference):
    result = api.img2img(
        images=[init_image()], prompt="a red coffee cup on a wooden table", seed=5, sampler_name="PLMS",
        denoising_strength=0.75, width=SIZE, height=SIZE, cfg_scale=GUIDANCE,
    )  # fmt: skip

    expected = diffusers_img2img_with_steps(img2img_reference, 5)
    np.testing.assert_array_equal(array(result.image), np.asarray(expected, dtype=np.int16))
    assert "Denoising strength: 0.75" in result.info["infotexts"][0]


def diffusers_img2img_with_steps(pipe, seed):
    from app.engine.schedulers import make_scheduler

    pipe.scheduler = make_scheduler("pndm", *pipe.model_scheduler)
    with torch.inference_mode():
        return pipe(
            prompt="a red coffee cup on a wooden table", image=init_image(), strength=0.75, num_inference_steps=STEPS,
            guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
        ).images[0]  # fmt: skip


@pytest.mark.parametrize("full_res", [True, False], ids=["only-masked", "whole-picture"])
def test_inpainting_keeps_the_outside_of_the_mask(api, full_res):
    mask = square_mask(box=(16, 16, 44, 40))
    result = api.img2img(
        images=[init_image()], mask_image=mask, prompt=PROMPT, seed=8, width=SIZE, height=SIZE,
        inpaint_full_res=full_res, inpaint_full_res_padding=4, mask_blur=4,
    )  # fmt: skip

    blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(4)))
    ours, source = array(result.image), array(init_image())
    np.testing.assert_array_equal(ours[blurred == 0], source[blurred == 0])
    assert np.abs(ours[blurred == 255] - source[blurred == 255]).mean() > 5
    assert "Mask blur: 4" in result.info["infotexts"][0]


def test_only_masked_inpainting_answers_at_the_init_images_own_size(api):
    source = init_image(4, size=96).crop((0, 0, 96, 80))
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (50, 30, 80, 60))

    result = api.img2img(images=[source], mask_image=mask, prompt=PROMPT, seed=8, width=SIZE, height=SIZE)

    assert result.image.size == (96, 80)  # as A1111 does with inpaint_full_res (webuiapi's default)
    outside = np.asarray(mask.filter(ImageFilter.GaussianBlur(4))) == 0
    np.testing.assert_array_equal(array(result.image)[outside], array(source)[outside])


def test_inverted_mask_keeps_the_inside(api):
    mask = square_mask(box=(16, 16, 48, 48))
    result = api.img2img(
        images=[init_image()], mask_image=mask, prompt=PROMPT, seed=8, width=SIZE, height=SIZE,
        inpainting_mask_invert=1, inpaint_full_res=False, inpainting_fill=1,
    )  # fmt: skip

    blurred = 255 - np.asarray(mask.filter(ImageFilter.GaussianBlur(4)))
    ours, source = array(result.image), array(init_image())
    np.testing.assert_array_equal(ours[blurred == 0], source[blurred == 0])


def test_get_loras_and_samplers_and_the_calls_around_them(api, server):
    loras = api.get_loras()
    samplers = [s["name"] for s in api.get_samplers()]

    assert [(x["name"], x["alias"], x["metadata"]["type"]) for x in loras] == [("acme", "acme", "style")]
    assert loras[0]["path"].endswith(".safetensors")
    assert samplers == ["Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS", "LMS", "UniPC"]
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "karras"]
    models = api.get_sd_models()
    assert len(models) == 1 and api.get_options()["sd_model_checkpoint"] == models[0]["title"]
    assert api.set_options({"sd_model_checkpoint": models[0]["title"]}) is None
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert httpx.post(f"{server.url}/sdapi/v1/refresh-loras", timeout=30).status_code == 200


def test_png_info_reads_our_infotext_back(api):
    image = api.txt2img(prompt=PROMPT, seed=12, width=SIZE, height=SIZE, negative_prompt="blurry").image

    info = api.png_info(image)

    assert info.info.startswith(PROMPT)
    params = info.parameters
    assert params["Prompt"] == PROMPT and params["Negative prompt"] == "blurry"
    assert params["Seed"] == "12" and params["Sampler"] == "Euler a" and params["Steps"] == str(STEPS)
    assert (params["Size-1"], params["Size-2"]) == (str(SIZE), str(SIZE))
    assert params["Lora hashes"].startswith("acme: ")


# ---- refusals ------------------------------------------------------------------------------------------

TXT = {"prompt": "a cup", "steps": 2, "width": SIZE, "height": SIZE}
REFUSED = [
    ("enable_hr", {"enable_hr": True}),
    ("restore_faces", {"restore_faces": True}),
    ("tiling", {"tiling": True}),
    ("subseed_strength", {"subseed_strength": 0.5}),
    ("script_name", {"script_name": "x/y/z plot"}),
    ("styles", {"styles": ["cinematic"]}),
    ("alwayson_scripts", {"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}),
    ("override_settings", {"override_settings": {"sd_model_checkpoint": "sdxl_base"}}),
    ("override_settings", {"override_settings": {"sd_vae": "other.vae"}}),
    ("seed_resize_from_w", {"seed_resize_from_w": 128}),
    ("seed_resize_from_h", {"seed_resize_from_h": 128}),
    ("override_settings", {"override_settings": {"CLIP_stop_at_last_layers": 2}}),
    ("alwayson_scripts", {"alwayson_scripts": {"ADetailer": [True, {"ad_model": "face_yolov8n.pt"}]}}),
    ("s_tmin", {"s_tmin": 0.5}),
    ("s_tmax", {"s_tmax": 10.0}),
    ("seed", {"seed": 2**32}),
    ("prompt", {"prompt": ""}),
    ("eta", {"eta": 0.5}),
    ("s_churn", {"s_churn": 1.0}),
    ("s_noise", {"s_noise": 0.9}),
    ("sampler_name", {"sampler_name": "Heun"}),
    ("scheduler", {"scheduler": "Exponential"}),
    ("scheduler", {"sampler_name": "Euler", "scheduler": "Karras"}),
    ("unknown_field", {"unknown_field": 1}),
    ("batch_size", {"batch_size": 17}),
    ("steps", {"steps": 0}),
    ("width", {"width": 100}),
]
REFUSED_IMG2IMG = [
    ("resize_mode", {"resize_mode": 1}),
    ("initial_noise_multiplier", {"initial_noise_multiplier": 1.5}),
    ("inpainting_fill", {"inpainting_fill": 2}),
    ("init_images", {"init_images": []}),
    ("init_images", {"init_images": ["aGVsbG8="]}),
    ("mask", {"mask": "aGVsbG8="}),
    ("init_images", {"init_images": ["a", "b"]}),
    ("mask_blur_x", {"mask_blur_x": 2, "mask_blur_y": 6}),
    ("denoising_strength", {"denoising_strength": 1.5}),
]


@pytest.mark.parametrize(("field", "fields"), REFUSED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(REFUSED)])
def test_txt2img_refuses_what_it_cannot_honour_naming_the_field(server, field, fields):
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**TXT, **fields}, timeout=60)

    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"][-1] == field, detail
    if field == "sampler_name":
        assert "Euler a" in detail["msg"] and "DPM++ 2M Karras" in detail["msg"]  # lists the known ones


@pytest.mark.parametrize(("field", "fields"), REFUSED_IMG2IMG, ids=[f for f, _ in REFUSED_IMG2IMG])
def test_img2img_refuses_what_it_cannot_honour_naming_the_field(server, field, fields):
    good_image = "data:image/png;base64," + png_b64(init_image())
    body = {**TXT, "init_images": [good_image], **fields}

    r = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=60)

    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == field, r.text


def test_a_lora_that_cannot_be_applied_is_refused_not_left_out(server):
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**TXT, "prompt": "a cup <lora:nope:0.5>"}, timeout=60)

    assert r.status_code == 422 and "nope" in r.text, r.text


def test_options_refuse_another_model(server):
    r = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl_base"}, timeout=30)

    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "sd_model_checkpoint", r.text


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- progress and interrupt ------------------------------------------------------------------------------

LONG_STEPS = 60  # long enough to be seen running (each step is reported), short enough to run to the end


def test_progress_is_idle_when_nothing_runs(api):
    progress = api.get_progress()

    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0 and progress["current_image"] is None


def test_interrupt_stops_a_long_generation_at_its_next_step_with_the_image_reached(api, server):
    fields = dict(prompt=PROMPT, seed=77, width=SIZE, height=SIZE, steps=LONG_STEPS)
    replies: list = []
    worker = threading.Thread(target=lambda: replies.append(api.txt2img(**fields, n_iter=2)))
    worker.start()

    running = wait_for(lambda: (p := api.get_progress())["state"]["sampling_step"] >= 2 and p, "a step to be reported")
    api.interrupt()
    worker.join(120)

    assert running["state"]["sampling_steps"] == LONG_STEPS and running["state"]["job_count"] == 2
    assert 0 < running["progress"] < 1 and running["state"]["interrupted"] is False
    preview = Image.open(io.BytesIO(base64.b64decode(running["current_image"])))
    assert preview.size == (SIZE // 8, SIZE // 8)  # the latent preview
    (result,) = replies
    assert len(result.images) == 1 and result.info["all_seeds"] == [77]  # the second image never started
    full = api.txt2img(**fields)
    assert np.abs(array(result.image) - array(full.image)).max() > 0  # stopped before the last step
    assert api.get_progress()["state"]["job_count"] == 0
