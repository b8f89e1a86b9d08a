"""Composing several LoRAs in one request (issue #5).

The engine's merge of three LoRAs (PEFT and kohya, with text-encoder layers) must equal diffusers' own
multi-adapter result; over HTTP the same LoRA set must give the same PNG bytes however it is written.
Everything runs on the embedded model at 64x64 with 2 steps.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.engine.embedded import embedded_model_path
from app.jobs import GenerationSpec, LoraSpec
from app.lora.synthetic import random_lora_state_dict, target_layers, write_lora
from app.main import create_app
from tests.conftest import assert_as_accurate_as_diffusers, pixels, render

SIZE = 64
STEPS = 2
GUIDANCE = 7.5
SEED = 5
PROMPT = "a red coffee cup on a wooden table"
MAX_PER_REQUEST = 3
VISIBLE_CHANGE = 0.02  # in 0..1 pixel units: the synthetic LoRAs change the image far more than this

# The three brands: PEFT with text-encoder layers, kohya with text-encoder layers and 3x3 convs (alpha
# != rank, so the scale matters), PEFT on the UNet only.
BRANDS = {
    "brand-a": dict(key_format="peft", with_text_encoder=True, convolutions=False, seed=31),
    "brand-b": dict(key_format="kohya", with_text_encoder=True, convolutions=True, seed=32, alpha=2.0),
    "brand-c": dict(key_format="peft", with_text_encoder=False, convolutions=False, seed=33),
}
WEIGHTS = {"brand-a": 0.7, "brand-b": 0.5, "brand-c": 0.3}


@pytest.fixture(scope="module")
def model_folder():
    return embedded_model_path(Settings().model_cache_dir)


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, model_folder):
    """`<root>/<brand>/style.safetensors` for the three brands, shaped for the embedded model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(model_folder), subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(str(model_folder), subfolder="text_encoder")
    root = tmp_path_factory.mktemp("composition-loras")
    for brand, args in BRANDS.items():
        layers = target_layers(
            unet, text_encoder, convolutions=args["convolutions"], with_text_encoder=args["with_text_encoder"]
        )
        state = random_lora_state_dict(
            layers, rank=4, alpha=args.get("alpha"), key_format=args["key_format"], seed=args["seed"], strength=1.0
        )
        write_lora(root / brand / "style.safetensors", state)
    return root


@pytest.fixture(scope="module")
def api(lora_root, model_folder):
    settings = Settings(
        model_cache_dir=Settings().model_cache_dir,
        lora_base_dir=lora_root,
        device="cpu",
        dtype="float32",
        log_level="warning",
        lora_max_per_request=MAX_PER_REQUEST,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        state = app.state.service_state
        assert state.wait_ready(120), f"the app did not become ready: {state.load_error}"
        yield client


@pytest.fixture(scope="module")
def generate(api):
    """POST /generate at the test size; 200 expected; identical bodies are generated once."""
    responses: dict[str, dict] = {}

    def post(**fields) -> dict:
        body = request_body(**fields)
        key = json.dumps(body, sort_keys=True)
        if key not in responses:
            response = api.post("/generate", json=body)
            assert response.status_code == 200, response.text
            responses[key] = response.json()
        return responses[key]

    return post


def request_body(**fields) -> dict:
    """A /generate body at the test size; fields override or add."""
    return {"prompt": PROMPT, "width": SIZE, "height": SIZE, "num_inference_steps": STEPS, "seed": SEED, **fields}


def png(response: dict) -> bytes:
    return base64.b64decode(response["image"])


def configs(*brands: str, weights: dict[str, float] | None = None) -> list[dict]:
    """lora_configs entries for brands, at WEIGHTS unless `weights` overrides them."""
    chosen = {**WEIGHTS, **(weights or {})}
    return [{"brand_id": b, "weight": chosen.get(b, 0.5)} for b in brands]


def post_error(api: TestClient, **fields) -> dict:
    response = api.post("/generate", json=request_body(**fields))
    assert response.status_code == 422, response.text[:300]
    return response.json()


# ---- the engine against diffusers ------------------------------------------------------------------


def test_three_loras_are_as_accurate_as_diffusers_set_adapters(api, lora_root, model_folder):
    state = api.app.state.service_state
    specs = [LoraSpec(brand, WEIGHTS[brand]) for brand in BRANDS]
    acquired = state.loras.acquire(specs)
    assert acquired.warnings == []
    spec = GenerationSpec(PROMPT, None, SIZE, SIZE, STEPS, GUIDANCE, SEED)
    merged = render(state.engine, spec, acquired.adapters)
    base = render(state.engine, spec)

    assert merged.shape == base.shape == (SIZE, SIZE, 3)
    assert np.abs(merged - base).max() > VISIBLE_CHANGE, "the composition should visibly change the image"
    loras = [(lora_root / brand / "style.safetensors", WEIGHTS[brand]) for brand in BRANDS]
    assert_as_accurate_as_diffusers(merged, model_folder, loras, SEED, GUIDANCE)


# ---- HTTP: the same set, written differently, gives the same bytes ---------------------------------


def test_order_of_lora_configs_does_not_change_the_image(api, generate):
    first = generate(lora_configs=configs("brand-a", "brand-b", "brand-c"))
    # Another set in between (not memoised), so the permuted order is merged afresh, not reused.
    between = api.post("/generate", json=request_body(lora_configs=configs("brand-b")))
    permuted = generate(lora_configs=configs("brand-c", "brand-a", "brand-b"))
    base = generate()

    assert between.status_code == 200, between.text

    # The same pixels; the PNG's infotext lists the LoRAs in the order they were asked for.
    assert pixels(png(first)).tobytes() == pixels(png(permuted)).tobytes()
    assert png(first) != png(base)
    assert [lora["brand_id"] for lora in permuted["loras"]] == ["brand-c", "brand-a", "brand-b"]


def test_weight_zero_member_gives_the_image_without_it(generate):
    with_zero = generate(lora_configs=configs("brand-a", "brand-b", weights={"brand-b": 0.0}))
    without = generate(lora_configs=configs("brand-a"))
    base = generate()

    assert png(with_zero) == png(without)
    assert png(without) != png(base)


def test_single_brand_form_equals_one_entry_list_form(generate):
    single = generate(brand_id="brand-a", lora_weights=0.7)
    listed = generate(lora_configs=[{"brand_id": "brand-a", "weight": 0.7}])

    assert png(single) == png(listed)
    assert single["loras"][0]["brand_id"] == listed["loras"][0]["brand_id"] == "brand-a"
    assert single["loras"][0]["weight"] == listed["loras"][0]["weight"] == 0.7


def test_brand_id_with_lora_configs_adds_the_brand_to_the_list(generate):
    combined = generate(brand_id="brand-c", lora_weights=0.3, lora_configs=configs("brand-a", "brand-b"))
    listed = generate(lora_configs=configs("brand-a", "brand-b", "brand-c"))
    without_brand = generate(lora_configs=configs("brand-a", "brand-b"))

    assert png(combined) == png(listed)
    assert png(combined) != png(without_brand)
    assert sorted((lora["brand_id"], lora["weight"]) for lora in combined["loras"]) == [
        ("brand-a", 0.7),
        ("brand-b", 0.5),
        ("brand-c", 0.3),
    ]


def test_type_is_echoed_for_each_lora(generate):
    response = generate(
        lora_configs=[
            {"brand_id": "brand-a", "weight": 0.7, "type": "style"},
            {"brand_id": "brand-b", "weight": 0.5, "type": "product"},
        ]
    )
    single = generate(brand_id="brand-a", lora_weights=0.7)

    assert [(lora["brand_id"], lora["type"]) for lora in response["loras"]] == [
        ("brand-a", "style"),
        ("brand-b", "product"),
    ]
    assert single["loras"][0]["type"] is None


def test_missing_member_is_skipped_with_a_warning_naming_it(generate):
    response = generate(lora_configs=configs("brand-a", "no-such-brand"))
    without = generate(lora_configs=configs("brand-a"))

    assert any("no-such-brand" in warning for warning in response["warnings"]), response["warnings"]
    assert [lora["brand_id"] for lora in response["loras"]] == ["brand-a"]
    assert png(response) == png(without)


# ---- HTTP: refused sets ------------------------------------------------------------------------------


def test_same_lora_twice_in_lora_configs_is_422(api):
    twice = [{"brand_id": "brand-a", "weight": 0.7}, {"brand_id": "brand-b"}, {"brand_id": "brand-a", "weight": 0.2}]
    body = post_error(api, lora_configs=twice)

    assert body["detail"][0]["loc"] == ["body", "lora_configs"]
    assert "brand-a" in body["detail"][0]["msg"]


def test_brand_id_also_in_lora_configs_is_422(api):
    body = post_error(api, brand_id="brand-a", lora_weights=0.5, lora_configs=configs("brand-a"))

    assert "brand-a" in body["detail"][0]["msg"]


def test_more_loras_than_the_limit_is_422_naming_lora_configs(api):
    four = configs("brand-a", "brand-b", "brand-c", "no-such-brand")
    too_many = post_error(api, lora_configs=four)
    with_brand = post_error(api, brand_id="brand-c", lora_configs=configs("brand-a", "brand-b", "no-such-brand"))

    for body in (too_many, with_brand):
        assert body["detail"][0]["loc"] == ["body", "lora_configs"]
        assert str(MAX_PER_REQUEST) in body["detail"][0]["msg"]
