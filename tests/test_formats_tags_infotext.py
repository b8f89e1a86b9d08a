"""<lora:...> prompt tags and the A1111 infotext in every PNG, over the HTTP API."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.infotext import build_infotext, lora_tag, model_name, parse_infotext, quote
from app.prompt_tags import InvalidPromptTag, parse_prompt_tags
from app.service import encode_png
from tests.conftest import GUIDANCE, SIZE, STEPS, generate, pixels, png_bytes, sha256_of, small_request


@pytest.fixture(scope="module")
def brands(tmp_path_factory, make_brand) -> dict:
    root = tmp_path_factory.mktemp("tag-loras")
    return {
        "root": root,
        "acme": make_brand(root, "acme", key_format="peft", seed=11),
        "globex-v1": make_brand(root, "globex", "v1", key_format="kohya", seed=21),
        "globex-v2": make_brand(root, "globex", "v2", key_format="kohya", seed=22),
    }


@pytest.fixture(scope="module")
def api(make_client, brands):
    with make_client(brands["root"]) as c:
        yield c



def infotext(body: dict) -> str:
    return Image.open(io.BytesIO(png_bytes(body["image"]))).text["parameters"]


# ---- prompt tags: parsing ---------------------------------------------------------------------------

CLEANED = {
    "a cup <lora:acme:0.5> on a table": "a cup on a table",
    "<lora:acme> a cup": "a cup",
    "a cup <lora:acme>": "a cup",
    "a cup,<lora:acme>, table": "a cup, , table",
    "a cup <lora:acme>\n<lora:globex@v1:0.2> on a table": "a cup\non a table",
    "a <b> cup <lora:acme>": "a <b> cup",
    "<lora:acme>": "",
}


@pytest.mark.parametrize("prompt, cleaned", CLEANED.items())
def test_tags_are_removed_with_the_whitespace_around_them(prompt, cleaned):
    assert parse_prompt_tags(prompt)[0] == cleaned


def test_tag_names_versions_and_weights():
    _, tags = parse_prompt_tags("x <lora:acme> <lora:globex@v2:0.25> <lora:studio-light:0>")
    assert [(t.brand_id, t.version, t.weight) for t in tags] == [
        ("acme", None, 1.0), ("globex", "v2", 0.25), ("studio-light", None, 0.0)
    ]


BAD_TAGS = {
    "weight above 1": "<lora:acme:1.5>",
    "negative weight": "<lora:acme:-0.1>",
    "weight not a number": "<lora:acme:strong>",
    "nan weight": "<lora:acme:nan>",
    "path in the name": "<lora:../etc:0.5>",
    "bad version": "<lora:acme@2:0.5>",
    "two weights": "<lora:acme:0.5:0.5>",
    "empty name": "<lora::0.5>",
}


@pytest.mark.parametrize("tag", BAD_TAGS.values(), ids=BAD_TAGS.keys())
def test_bad_tag_is_422_quoting_the_tag(api, tag):
    response = api.post("/generate", json=small_request(prompt=f"a cup {tag} on a table"))

    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "prompt"]
    assert tag in error["msg"], error["msg"]
    with pytest.raises(InvalidPromptTag):
        parse_prompt_tags(f"a cup {tag}")


def test_unclosed_tag_is_422(api):
    response = api.post("/generate", json=small_request(prompt="a cup <lora:acme:0.5"))
    assert response.status_code == 422 and "not closed" in response.json()["detail"][0]["msg"]


# ---- prompt tags: images ----------------------------------------------------------------------------


def test_tag_image_equals_lora_configs_with_the_tag_free_prompt(api, brands):
    tagged = generate(api, prompt="a red coffee cup <lora:acme:0.6> on a table <lora:globex@v1:0.3>")
    plain = generate(
        api, prompt="a red coffee cup on a table",
        lora_configs=[{"brand_id": "acme", "weight": 0.6}, {"brand_id": "globex", "version": "v1", "weight": 0.3}],
    )  # fmt: skip
    base = generate(api, prompt="a red coffee cup on a table")

    np.testing.assert_array_equal(pixels(png_bytes(tagged["image"])), pixels(png_bytes(plain["image"])))
    assert np.abs(pixels(png_bytes(tagged["image"])) - pixels(png_bytes(base["image"]))).mean() > 1
    assert [(x["brand_id"], x["version"], x["weight"]) for x in tagged["loras"]] == [
        ("acme", "default", 0.6), ("globex", "v1", 0.3)
    ]
    assert tagged["loras"][1]["sha256"] == sha256_of(brands["globex-v1"])
    assert tagged["warnings"] == []


def test_tag_without_weight_is_weight_one(api):
    tagged = generate(api, prompt="a red coffee cup <lora:acme>")
    plain = generate(api, prompt="a red coffee cup", lora_configs=[{"brand_id": "acme", "weight": 1.0}])

    assert tagged["loras"][0]["weight"] == 1.0
    np.testing.assert_array_equal(pixels(png_bytes(tagged["image"])), pixels(png_bytes(plain["image"])))


def test_tags_combine_with_brand_id(api):
    both = generate(api, prompt="a cup <lora:acme:0.5>", brand_id="globex", lora_weights=0.4)
    assert sorted((x["brand_id"], x["weight"]) for x in both["loras"]) == [("acme", 0.5), ("globex", 0.4)]


@pytest.mark.parametrize("fields", [
    {"prompt": "a cup <lora:acme:0.5>", "brand_id": "acme"},
    {"prompt": "a cup <lora:acme:0.5>", "lora_configs": [{"brand_id": "acme"}]},
    {"prompt": "a cup <lora:acme:0.5> <lora:acme:0.2>"},
], ids=["with brand_id", "with lora_configs", "twice in the prompt"])  # fmt: skip
def test_a_lora_given_twice_is_422(api, fields):
    response = api.post("/generate", json=small_request(**fields))

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert "<lora:acme:" in response.json()["detail"][0]["msg"]


def test_tag_and_latest_by_name_resolving_to_one_file_is_422(api):
    response = api.post("/generate", json=small_request(prompt="a cup <lora:globex@v2>", brand_id="globex"))
    assert response.status_code == 422 and "twice" in response.json()["detail"][0]["msg"]


def test_tag_for_a_missing_brand_falls_back_with_a_warning(api):
    tagged = generate(api, prompt="a red coffee cup <lora:nobody:0.5>")
    base = generate(api, prompt="a red coffee cup")

    assert tagged["loras"] == []
    assert len(tagged["warnings"]) == 1 and "nobody" in tagged["warnings"][0]
    np.testing.assert_array_equal(pixels(png_bytes(tagged["image"])), pixels(png_bytes(base["image"])))


def test_tags_in_the_negative_prompt_are_plain_text(api, reference_pipe):
    negative = "blurry <lora:acme:0.5>"
    body = generate(api, seed=3, negative_prompt=negative)

    assert body["loras"] == [] and body["warnings"] == []
    with torch.inference_mode():
        expected = reference_pipe(
            prompt=small_request()["prompt"], negative_prompt=negative, width=SIZE, height=SIZE,
            num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(3),
        ).images[0]  # fmt: skip
    np.testing.assert_array_equal(pixels(png_bytes(body["image"])), np.asarray(expected, dtype=np.int16))
    assert "Negative prompt: blurry <lora:acme:0.5>" in infotext(body)


def test_ab_test_adds_the_prompt_tags_to_every_variant(api):
    prompt = "a red coffee cup <lora:acme:0.5>"
    ab = api.post("/ab-test", json={
        **small_request(prompt=prompt, seed=4),
        "grid": [{"brand_id": "globex", "weights": [0.0, 0.5]}],
    })  # fmt: skip
    assert ab.status_code == 200, ab.text
    variants = ab.json()["variants"]

    for variant, weight in zip(variants, [0.0, 0.5], strict=True):
        assert [(x["brand_id"], x["weight"]) for x in variant["loras"]] == [("globex", weight), ("acme", 0.5)]
        same = generate(api, prompt=prompt, seed=4, brand_id="globex", lora_weights=weight)
        assert variant["image"] == same["image"]  # byte-identical, infotext included

    duplicate = api.post("/ab-test", json={
        **small_request(prompt=prompt, seed=4), "grid": [{"brand_id": "acme", "weights": [0.2, 0.8]}],
    })  # fmt: skip
    assert duplicate.status_code == 422 and duplicate.json()["detail"][0]["loc"] == ["body", "prompt"]


# ---- infotext ----------------------------------------------------------------------------------------


def test_infotext_in_a1111_layout_with_lora_hashes(api, brands):
    body = generate(
        api, prompt="a red coffee cup <lora:acme:0.6>", negative_prompt="blurry, dark", seed=42,
        scheduler="euler_a", guidance_scale=7.5, brand_id="globex", version="v1", lora_weights=0.4,
    )  # fmt: skip

    acme, globex = sha256_of(brands["acme"])[:10], sha256_of(brands["globex-v1"])[:10]
    assert infotext(body) == (
        "a red coffee cup <lora:acme:0.6> <lora:globex@v1:0.4>\n"
        "Negative prompt: blurry, dark\n"
        f'Steps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: tiny, '
        f'Lora hashes: "globex: {globex}, acme: {acme}"'
    )


def test_infotext_without_negative_prompt_or_loras(api):
    body = generate(api, seed=5, scheduler="dpmpp_2m_karras", guidance_scale=7.0)
    assert infotext(body) == (
        "a red coffee cup on a wooden table\n"
        "Steps: 2, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, Size: 64x64, Model: tiny"
    )


@pytest.mark.parametrize("name, display", [
    ("pndm", "PNDM"), ("ddim", "DDIM"), ("euler", "Euler"), ("euler_a", "Euler a"), ("dpmpp_2m", "DPM++ 2M"),
    ("dpmpp_2m_karras", "DPM++ 2M Karras"), ("lms", "LMS"), ("unipc", "UniPC"),
])  # fmt: skip
def test_sampler_display_names(name, display):
    text = build_infotext(prompt="p", negative_prompt=None, steps=1, scheduler=name, guidance_scale=1.0, seed=0,
                          width=64, height=64, model_id="tiny")  # fmt: skip
    assert f"Sampler: {display}," in text


def test_infotext_leaves_the_pixels_alone(api, engine):
    from tests.conftest import render, spec

    body = generate(api, seed=7)
    png = png_bytes(body["image"])
    engine_image = render(engine, spec(7), output_type="pil")
    without = encode_png(engine_image)

    assert Image.open(io.BytesIO(without)).text == {}
    np.testing.assert_array_equal(pixels(png), pixels(without))
    np.testing.assert_array_equal(pixels(png), np.asarray(engine_image, dtype=np.int16))
    Image.open(io.BytesIO(png)).verify()


def test_model_name_and_quoting(tmp_path):
    folder = tmp_path / "my-sd15"
    folder.mkdir()
    assert model_name(str(folder)) == "my-sd15"
    assert model_name(str(folder) + "/") == "my-sd15"
    assert model_name("tiny") == "tiny"
    assert model_name("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert quote("a, b") == '"a, b"' and quote("plain") == "plain" and quote('x: "y"') == '"x: \\"y\\""'


def test_weight_zero_lora_is_not_listed(api):
    body = generate(api, seed=7, brand_id="acme", lora_weights=0.0)
    assert "Lora hashes" not in infotext(body)


# ---- the infotext reproduces the image ------------------------------------------------------------


def test_lora_configs_appear_as_tags_once_each(api):
    body = generate(
        api, prompt="a red coffee cup <lora:acme:0.6>", seed=8,
        lora_configs=[{"brand_id": "globex", "weight": 0.3}, {"brand_id": "globex", "version": "v1", "weight": 0.2}],
    )  # fmt: skip

    # The prompt's own tag stays as written, once; the configs follow, each pinned to the file applied.
    assert infotext(body).split("\n")[0] == "a red coffee cup <lora:acme:0.6> <lora:globex@v2:0.3> <lora:globex@v1:0.2>"


@pytest.mark.parametrize("fields", [
    dict(brand_id="globex", lora_weights=0.45),
    dict(lora_configs=[{"brand_id": "acme", "weight": 0.7}, {"brand_id": "globex", "version": "v1", "weight": 0.35}]),
    dict(prompt="a cup,\n<lora:acme:0.25> on a table", negative_prompt="blurry, dark: \"x\"", scheduler="euler_a",
         guidance_scale=6.5, brand_id="globex", version="v2", lora_weights=0.1234567),
], ids=["brand_id", "lora_configs", "tags-and-brand_id"])  # fmt: skip
def test_the_infotext_read_back_is_a_request_for_the_same_image(api, fields):
    first = generate(api, seed=12, **fields)

    request = parse_infotext(infotext(first)).generate_request()
    again = api.post("/generate", json=request)

    assert again.status_code == 200, again.text
    assert first["loras"] and {lora["sha256"] for lora in again.json()["loras"]} == {
        lora["sha256"] for lora in first["loras"]
    }
    np.testing.assert_array_equal(pixels(png_bytes(again.json()["image"])), pixels(png_bytes(first["image"])))


def test_parse_infotext_reads_what_build_infotext_writes():
    text = build_infotext(
        prompt="line one, with: colons\nline two <lora:acme:0.5>", negative_prompt="bad, \"quoted\"\nsecond",
        steps=3, scheduler="dpmpp_2m_karras", guidance_scale=7.25, seed=99, width=64, height=128,
        model_id="tiny", loras=[("acme", "0123456789abcdef")],
    )  # fmt: skip
    parsed = parse_infotext(text)

    assert parsed.prompt == "line one, with: colons\nline two <lora:acme:0.5>"
    assert parsed.negative_prompt == 'bad, "quoted"\nsecond'
    assert parsed.fields["Lora hashes"] == "acme: 0123456789"
    assert parsed.generate_request() == {
        "prompt": "line one, with: colons\nline two <lora:acme:0.5>", "negative_prompt": 'bad, "quoted"\nsecond',
        "width": 64, "height": 128, "num_inference_steps": 3, "guidance_scale": 7.25, "seed": 99,
        "scheduler": "dpmpp_2m_karras",
    }  # fmt: skip


def test_lora_tag_weights_read_back_as_the_same_float():
    for weight in (1.0, 0.0, 0.5, 0.1 + 0.2, 0.1234567, 1e-05):
        _, [tag] = parse_prompt_tags(lora_tag("acme", weight))
        assert tag.weight == weight
    assert lora_tag("acme", 1.0) == "<lora:acme:1>" and lora_tag("acme", 0.7) == "<lora:acme:0.7>"
