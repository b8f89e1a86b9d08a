"""POST /v1/images/edits with the official `openai` client's `images.edit` against a real server.

OpenAI's mask convention: the mask's fully transparent pixels are edited. Image i is /generate's
inpainting image with seed + i (the same init image, the same mask as white = repaint).
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image, ImageFilter

from tests.test_editing import b64, init_image, square_mask

SIZE = 64
STEPS = 4
PROMPT = "a red coffee cup <lora:acme:0.6>"


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_brand):
    from tests.conftest import ServerProcess

    work = tmp_path_factory.mktemp("openai-edits")
    make_brand(work / "loras", "acme", seed=17)
    server = ServerProcess(work, {})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def png_file(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def openai_mask(white_is_edit: Image.Image) -> Image.Image:
    """OpenAI's mask: transparent where ours is white."""
    mask = Image.new("RGBA", white_is_edit.size, (0, 0, 0, 255))
    mask.putalpha(Image.eval(white_is_edit, lambda v: 0 if v == 255 else 255))
    return mask


def test_images_edit_equals_generate_inpainting_and_keeps_the_outside(client, server):
    ours = square_mask()
    result = client.images.edit(
        image=("photo.png", png_file(init_image()), "image/png"),
        mask=("mask.png", png_file(openai_mask(ours)), "image/png"),
        prompt=PROMPT, n=2, size=f"{SIZE}x{SIZE}", response_format="b64_json",
        extra_body={"seed": 21, "num_inference_steps": STEPS},
    )  # fmt: skip

    assert len(result.data) == 2
    blurred = np.asarray(ours.filter(ImageFilter.GaussianBlur(4)))
    source = np.asarray(init_image())
    for i, item in enumerate(result.data):
        png = base64.b64decode(item.b64_json)
        same = httpx.post(f"{server.url}/generate", timeout=120, json={
            "prompt": PROMPT, "seed": 21 + i, "width": SIZE, "height": SIZE, "num_inference_steps": STEPS,
            "init_image": b64(init_image()), "mask_image": b64(ours)})  # fmt: skip
        assert same.status_code == 200, same.text
        assert png == base64.b64decode(same.json()["image"])  # byte-identical PNG
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        np.testing.assert_array_equal(pixels[blurred == 0], source[blurred == 0])
    assert result.data[0].b64_json != result.data[1].b64_json


def test_images_edit_takes_the_images_own_transparency_as_the_mask(client):
    image = init_image().convert("RGBA")
    image.putalpha(Image.eval(square_mask(), lambda v: 0 if v == 255 else 255))

    result = client.images.edit(
        image=("photo.png", png_file(image), "image/png"),
        prompt=PROMPT,
        extra_body={"seed": 3, "num_inference_steps": STEPS},
    )

    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))
    assert out.shape == (SIZE, SIZE, 3)  # size "auto": the image's own
    blurred = np.asarray(square_mask().filter(ImageFilter.GaussianBlur(4)))
    np.testing.assert_array_equal(out[blurred == 0], np.asarray(init_image())[blurred == 0])


@pytest.mark.parametrize(
    ("files", "param"),
    [
        ({"mask": ("m.png", png_file(Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))), "image/png")}, "mask"),
        ({"mask": ("m.png", png_file(openai_mask(square_mask(size=32, box=(4, 4, 20, 20)))), "image/png")}, "mask"),
        ({"mask": ("m.png", b"not an image", "image/png")}, "mask"),
    ],
    ids=["mask-without-transparency", "mask-of-another-size", "mask-not-an-image"],
)
def test_images_edit_refuses_a_bad_mask_naming_it(client, files, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(
            image=("photo.png", png_file(init_image()), "image/png"), prompt=PROMPT,
            extra_body={"num_inference_steps": STEPS}, **files,
        )  # fmt: skip
    assert refused.value.status_code == 400 and refused.value.body["param"] == param, refused.value.body


def test_images_edit_refuses_an_image_that_is_not_one(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(image=("photo.png", b"GIF89a nope", "image/png"), prompt=PROMPT)
    assert refused.value.body["param"] == "image"
