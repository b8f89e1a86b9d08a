"""Image editing (img2img, inpainting) through the one request path, against diffusers itself.

img2img is diffusers' `StableDiffusionImg2ImgPipeline` built from the same components: bit-exact alone,
within the batching bound (1 level of 255, tests/test_batching.py) in a batch. Inpainting keeps the
init image pixel for pixel outside the blurred mask (the original is pasted back, as AUTOMATIC1111
does) and, where the blurred mask is white, is diffusers' `StableDiffusionInpaintPipeline` (4-channel
UNet: its latents are blended with the init image's at every step).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from app.editing import build_edit
from app.infotext import PNG_TEXT_KEY
from app.jobs import ActiveAdapter, GenerationJob, GenerationSpec
from tests.conftest import GUIDANCE, PROMPT, SIZE, generate, pixels, png_bytes

ONE_LEVEL = 1 / 255
STEPS = 4  # img2img runs int(steps x strength) of them
STRENGTH = 0.75


def init_image(seed: int = 0, size: int = SIZE) -> Image.Image:
    """A photo-like test image: a smooth gradient with some texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 1 - x * y], axis=-1) * 200 + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def square_mask(size: int = SIZE, box=(20, 20, 44, 44)) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def edit_spec(seed=7, image=None, mask=None, strength=STRENGTH, scheduler="pndm", blur=4, only_masked=False, **kw):
    edit = build_edit(
        init_image=image or init_image(), mask_image=mask, width=SIZE, height=SIZE, strength=strength,
        mask_blur=blur, inpaint_only_masked=only_masked, inpaint_padding=kw.pop("padding", 8),
    )  # fmt: skip
    return GenerationSpec(PROMPT, None, SIZE, SIZE, STEPS, GUIDANCE, seed, scheduler=scheduler, edit=edit, **kw)


def render(engine, spec, adapters=()):
    return engine.generate(GenerationJob(spec, tuple(adapters)), output_type="np").image


@pytest.fixture(scope="module")
def img2img_reference(reference_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**reference_pipe.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_scheduler = type(pipe.scheduler), pipe.scheduler.config  # PNDM, whatever a test sets later
    return pipe


@pytest.fixture(scope="module")
def inpaint_reference(reference_pipe):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(**reference_pipe.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_img2img(pipe, image, seed, strength=STRENGTH, scheduler="pndm", output_type="np"):
    from app.engine.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(scheduler, *pipe.model_scheduler)
    with torch.inference_mode():
        return pipe(
            prompt=PROMPT, image=image, strength=strength, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type,
        ).images[0]  # fmt: skip


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a"])
def test_img2img_alone_equals_diffusers_img2img(engine, img2img_reference, scheduler):
    ours = render(engine, edit_spec(seed=5, scheduler=scheduler))
    theirs = diffusers_img2img(img2img_reference, init_image(), 5, scheduler=scheduler)

    np.testing.assert_array_equal(ours, theirs)
    other_image = render(engine, edit_spec(seed=5, scheduler=scheduler, image=init_image(3)))
    assert np.abs(ours - other_image).max() > 0.05  # the init image shapes the result


def test_img2img_batched_equals_the_single_images(engine):
    specs = [edit_spec(seed=3, image=init_image(1)), edit_spec(seed=4, image=init_image(2))]
    jobs = [GenerationJob(s) for s in specs]

    singles = [engine.generate(j, output_type="np").image for j in jobs]
    batched = engine.generate_batch(jobs, output_type="np")

    assert [r.batch_size for r in batched] == [2, 2]
    for single, result in zip(singles, batched, strict=True):
        assert np.abs(single - result.image).max() <= ONE_LEVEL
    assert np.abs(singles[0] - singles[1]).max() > 0.05


def test_inpainting_batched_equals_the_single_images_and_keeps_each_outside(engine, make_lora, tmp_path):
    lora = (ActiveAdapter("batch-lora", engine.load_adapter(make_lora(tmp_path / "b.safetensors", seed=43)), 0.8),)
    masks = [square_mask(), square_mask(box=(8, 30, 40, 60))]
    jobs = [GenerationJob(edit_spec(seed=3, image=init_image(1), mask=masks[0])),  # the base model
            GenerationJob(edit_spec(seed=4, image=init_image(2), mask=masks[1]), lora)]  # fmt: skip

    singles = [engine.generate(j, output_type="np").image for j in jobs]
    batched = engine.generate_batch(jobs, output_type="np")  # two LoRA sets: per-image deltas

    for i, (single, result) in enumerate(zip(singles, batched, strict=True)):
        # Inpainting's output is 8-bit (the original is pasted back on the PNG's pixels): the bound in levels.
        levels = np.abs(np.round(single * 255) - np.round(result.image * 255))
        assert result.batch_size == 2 and levels.max() <= 1
        outside = blurred(masks[i]) == 0
        np.testing.assert_array_equal(result.image[outside], np.asarray(init_image(i + 1))[outside] / np.float32(255))


def test_an_edit_spec_goes_through_json_and_pickle_unchanged(engine):
    import json
    import pickle
    from dataclasses import asdict

    spec = edit_spec(seed=9, mask=square_mask(), only_masked=True)

    from_json = GenerationSpec(**json.loads(json.dumps(asdict(spec))))  # what a job store does
    assert from_json == spec and pickle.loads(pickle.dumps(spec)) == spec  # what a Ray replica gets
    np.testing.assert_array_equal(render(engine, from_json), render(engine, spec))


def test_edit_jobs_batch_only_with_edits_of_the_same_kind_and_strength():
    txt = GenerationJob(GenerationSpec(PROMPT, None, SIZE, SIZE, STEPS, GUIDANCE, 1))
    a = GenerationJob(edit_spec(seed=1, image=init_image(1)))
    b = GenerationJob(edit_spec(seed=2, image=init_image(2)))  # another image and seed: same loop
    other_strength = GenerationJob(edit_spec(seed=1, strength=0.5))
    inpaint = GenerationJob(edit_spec(seed=1, mask=square_mask()))

    assert a.batch_key == b.batch_key
    assert len({txt.batch_key, a.batch_key, other_strength.batch_key, inpaint.batch_key}) == 4


def blurred(mask: Image.Image, radius: int = 4) -> np.ndarray:
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(radius)))


def test_inpainting_keeps_the_outside_and_repaints_the_inside_as_diffusers(engine, inpaint_reference):
    mask = square_mask()
    ours = np.asarray(engine.generate(GenerationJob(edit_spec(seed=9, mask=mask)), output_type="pil").image)
    with torch.inference_mode():
        theirs = inpaint_reference(
            prompt=PROMPT, image=init_image(), mask_image=mask.filter(ImageFilter.GaussianBlur(4)), strength=STRENGTH,
            width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(9),
        ).images[0]  # fmt: skip
    weights = blurred(mask)
    source = np.asarray(init_image())

    outside, inside = weights == 0, weights == 255
    assert outside.sum() > 0 and inside.sum() > 0
    np.testing.assert_array_equal(ours[outside], source[outside])  # pixel for pixel
    np.testing.assert_array_equal(ours[inside], np.asarray(theirs)[inside])
    assert np.abs(ours[inside].astype(int) - source[inside]).mean() > 5  # repainted


def test_inpainting_with_a_lora_changes_only_the_inside(engine, make_lora, tmp_path):
    lora = (ActiveAdapter("inpaint-lora", engine.load_adapter(make_lora(tmp_path / "l.safetensors", seed=41)), 0.9),)
    spec = edit_spec(seed=9, mask=square_mask())
    plain = np.asarray(engine.generate(GenerationJob(spec), output_type="pil").image).astype(int)
    styled = np.asarray(engine.generate(GenerationJob(spec, lora), output_type="pil").image).astype(int)
    weights = blurred(square_mask())

    np.testing.assert_array_equal(styled[weights == 0], plain[weights == 0])
    assert np.abs(styled[weights == 255] - plain[weights == 255]).mean() > 2


def test_inpainting_only_the_masked_area_keeps_the_outside(engine):
    mask = square_mask(box=(36, 4, 60, 28))
    spec = edit_spec(seed=2, mask=mask, only_masked=True, padding=4)
    ours = np.asarray(engine.generate(GenerationJob(spec), output_type="pil").image)
    weights = blurred(mask)
    source = np.asarray(init_image())

    assert ours.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(ours[weights == 0], source[weights == 0])
    assert np.abs(ours[weights == 255].astype(int) - source[weights == 255]).mean() > 5
    whole = np.asarray(engine.generate(GenerationJob(edit_spec(seed=2, mask=mask)), output_type="pil").image)
    assert np.abs(ours.astype(int) - whole).max() > 0  # the crop was painted at full size: another image


def test_inpainting_only_the_masked_area_keeps_the_images_own_size(engine):
    source = init_image(4, size=96).crop((0, 0, 96, 80))  # another size and ratio than the 64x64 asked for
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (50, 30, 80, 60))
    edit = build_edit(init_image=source, mask_image=mask, width=SIZE, height=SIZE, strength=STRENGTH, mask_blur=4,
                      inpaint_only_masked=True, inpaint_padding=4)  # fmt: skip
    spec = GenerationSpec(PROMPT, None, SIZE, SIZE, STEPS, GUIDANCE, 5, edit=edit)

    out = np.asarray(engine.generate(GenerationJob(spec), output_type="pil").image)

    assert out.shape == (80, 96, 3)  # A1111's "only masked": the mask's box is painted at 64x64, pasted back
    weights = blurred(mask)
    np.testing.assert_array_equal(out[weights == 0], np.asarray(source)[weights == 0])
    assert np.abs(out[weights == 255].astype(int) - np.asarray(source)[weights == 255]).mean() > 5


# ---- over HTTP ----------------------------------------------------------------------------------------


def test_generate_img2img_equals_diffusers_and_writes_the_infotext(client, img2img_reference):
    body = generate(client, init_image=b64(init_image()), num_inference_steps=STEPS, seed=5)
    theirs = diffusers_img2img(img2img_reference, init_image(), 5, output_type="pil")

    image = Image.open(io.BytesIO(png_bytes(body["image"])))
    np.testing.assert_array_equal(pixels(png_bytes(body["image"])), np.asarray(theirs, dtype=np.int16))
    assert "Denoising strength: 0.75" in image.info[PNG_TEXT_KEY]


def test_generate_resizes_the_init_image_and_accepts_a_data_url_and_jpeg(client, img2img_reference):
    big = init_image(size=128)
    url = "data:image/jpeg;base64," + b64(big, "JPEG")
    body = generate(client, init_image=url, num_inference_steps=STEPS, seed=5, strength=0.5)

    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    expected = diffusers_img2img(
        img2img_reference, decoded.resize((SIZE, SIZE), Image.Resampling.LANCZOS), 5, strength=0.5, output_type="pil"
    )
    assert (body["width"], body["height"]) == (SIZE, SIZE)
    np.testing.assert_array_equal(pixels(png_bytes(body["image"])), np.asarray(expected, dtype=np.int16))


def test_generate_inpainting_with_a_brand_keeps_the_outside(client, make_brand, lora_root):
    make_brand(lora_root, "acme", seed=3)
    mask = square_mask()
    fields = dict(init_image=b64(init_image()), mask_image=b64(mask), num_inference_steps=STEPS, seed=6)
    body = generate(client, brand_id="acme", **fields)
    base = generate(client, **fields)

    ours, plain = pixels(png_bytes(body["image"])), pixels(png_bytes(base["image"]))
    weights = blurred(mask)
    np.testing.assert_array_equal(ours[weights == 0], np.asarray(init_image(), dtype=np.int16)[weights == 0])
    assert np.abs(ours[weights == 255] - plain[weights == 255]).mean() > 2  # the brand repainted the inside
    infotext = Image.open(io.BytesIO(png_bytes(body["image"]))).info[PNG_TEXT_KEY]
    assert "Denoising strength: 0.75, Mask blur: 4" in infotext and "Lora hashes" in infotext
