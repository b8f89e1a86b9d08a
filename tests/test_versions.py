"""LoRA versions in /generate (issue #5): the latest by number, explicit versions, unknown versions.

A brand with v1, v2 and v10 folders must default to v10 (v10 > v9 by number, although "v2" > "v10"
as strings); an explicit version picks that exact file, at the top level and inside lora_configs.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.engine.embedded import embedded_model_path
from app.lora.synthetic import random_lora_state_dict, target_layers, write_lora
from app.main import create_app

SIZE = 64
STEPS = 2
SEED = 9
PROMPT = "a blue bottle on a white shelf"

# brand folder / version folder -> seed of its LoRA; each file has different bytes.
VERSIONED = {"v1": 41, "v2": 42, "v10": 43}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory) -> Path:
    """`multi/{v1,v2,v10}/style.safetensors` and `flat/style.safetensors` (no version folders)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = str(embedded_model_path(Settings().model_cache_dir))
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    layers = target_layers(unet, text_encoder)
    root = tmp_path_factory.mktemp("version-loras")
    for version, seed in VERSIONED.items():
        write_lora(root / "multi" / version / "style.safetensors", random_lora_state_dict(layers, seed=seed))
    write_lora(root / "flat" / "style.safetensors", random_lora_state_dict(layers, key_format="kohya", seed=44))
    return root


@pytest.fixture(scope="module")
def api(lora_root):
    settings = Settings(
        model_cache_dir=Settings().model_cache_dir,
        lora_base_dir=lora_root,
        device="cpu",
        dtype="float32",
        log_level="warning",
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
        body = {"prompt": PROMPT, "width": SIZE, "height": SIZE, "num_inference_steps": STEPS, "seed": SEED, **fields}
        key = json.dumps(body, sort_keys=True)
        if key not in responses:
            response = api.post("/generate", json=body)
            assert response.status_code == 200, response.text
            responses[key] = response.json()
        return responses[key]

    return post


def png(response: dict) -> bytes:
    return base64.b64decode(response["image"])


def test_default_version_is_the_highest_number(generate, lora_root):
    response = generate(brand_id="multi")

    applied = response["loras"][0]
    assert applied["version"] == "v10"
    assert applied["file"] == "multi/v10/style.safetensors"
    assert applied["sha256"] == sha256_of(lora_root / "multi" / "v10" / "style.safetensors")
    assert response["warnings"] == []


def test_explicit_top_level_version_uses_that_file(generate, lora_root):
    v1 = generate(brand_id="multi", version="v1")
    latest = generate(brand_id="multi")

    assert v1["loras"][0]["version"] == "v1"
    assert v1["loras"][0]["sha256"] == sha256_of(lora_root / "multi" / "v1" / "style.safetensors")
    assert png(v1) != png(latest)


def test_explicit_version_inside_lora_configs_uses_that_file(generate, lora_root):
    v2 = generate(lora_configs=[{"brand_id": "multi", "version": "v2", "weight": 0.8}])
    v1_listed = generate(lora_configs=[{"brand_id": "multi", "version": "v1", "weight": 0.8}])
    v1_top_level = generate(brand_id="multi", version="v1", lora_weights=0.8)

    assert v2["loras"][0]["version"] == "v2"
    assert v2["loras"][0]["sha256"] == sha256_of(lora_root / "multi" / "v2" / "style.safetensors")
    assert v1_listed["loras"][0]["sha256"] == sha256_of(lora_root / "multi" / "v1" / "style.safetensors")
    assert png(v1_listed) == png(v1_top_level)
    assert png(v2) != png(v1_listed)


def test_unknown_version_warns_and_gives_the_base_image(generate):
    response = generate(brand_id="multi", version="v7")
    base = generate()

    assert response["loras"] == []
    assert len(response["warnings"]) == 1
    warning = response["warnings"][0]
    assert "multi" in warning and "v7" in warning
    assert "v1, v2, v10" in warning, "the warning should list the versions that exist"
    assert png(response) == png(base)


def test_unknown_version_in_lora_configs_skips_only_that_member(generate):
    response = generate(lora_configs=[{"brand_id": "multi", "version": "v7"}, {"brand_id": "flat"}])
    flat_only = generate(lora_configs=[{"brand_id": "flat"}])

    assert [lora["brand_id"] for lora in response["loras"]] == ["flat"]
    assert any("multi" in w and "v7" in w for w in response["warnings"]), response["warnings"]
    assert png(response) == png(flat_only)


def test_file_directly_in_the_brand_folder_is_version_default(generate, lora_root):
    response = generate(brand_id="flat")
    explicit = generate(brand_id="flat", version="default")

    applied = response["loras"][0]
    assert applied["version"] == "default"
    assert applied["file"] == "flat/style.safetensors"
    assert applied["sha256"] == sha256_of(lora_root / "flat" / "style.safetensors")
    assert png(explicit) == png(response)


def test_same_file_named_by_latest_and_by_its_version_is_422(api):
    """`multi` and `multi@v10` are the same file: applying it twice would double its effect."""
    body = {
        "prompt": PROMPT,
        "width": SIZE,
        "height": SIZE,
        "num_inference_steps": STEPS,
        "seed": SEED,
        "lora_configs": [{"brand_id": "multi"}, {"brand_id": "multi", "version": "v10"}],
    }

    response = api.post("/generate", json=body)

    applied = [(lora["brand_id"], lora["version"]) for lora in response.json().get("loras", [])]
    assert response.status_code == 422, f"status {response.status_code}; applied: {applied}"
    assert "multi" in response.json()["detail"][0]["msg"]
