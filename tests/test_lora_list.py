"""GET /lora/list and GET /lora/{brand_id}/metadata (issue #5).

Real LoRA files (kohya and PEFT, F32 and F16, with and without text-encoder layers and metadata.json)
are written for the embedded model; what the endpoints report is checked against the files themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.config import Settings
from app.engine.embedded import embedded_model_path
from app.lora import file_facts as file_facts_module
from app.lora.synthetic import random_lora_state_dict, target_layers, write_lora
from app.main import create_app

KOHYA_METADATA = {
    "training_steps": 1500,
    "learning_rate": 0.0001,
    "dataset_size": 32,
    "base_model": "runwayml/stable-diffusion-v1-5",
    "version_notes": "first cut",
    "type": "style",
    "trigger_words": ["acme style"],
    "owner": "design team",  # not a known field: kept as it is
    "review": {"approved": True, "by": ["ana", "li"]},
}
BRAND_METADATA = {"type": "product", "version_notes": "brand-level notes", "dataset_size": 12}
V2_METADATA = {"type": "style", "version_notes": "v2: brighter palette", "extra": [1, 2, 3]}
FILLERS = ("filler-1", "filler-2", "filler-3", "filler-4")
ALL_BRANDS = sorted(("kohya-meta", "peft-plain", "versioned", *FILLERS))
KOHYA_ALPHA = 2.0


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def layers():
    """Layer sets of the embedded model: UNet + text encoder, UNet only, and a two-layer sliver."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = str(embedded_model_path(Settings().model_cache_dir))
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    unet_only = target_layers(unet, text_encoder, with_text_encoder=False)
    return {"with_text_encoder": target_layers(unet, text_encoder), "unet_only": unet_only, "small": unet_only[:2]}


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, layers) -> Path:
    root = tmp_path_factory.mktemp("list-loras")
    write_lora(
        root / "kohya-meta" / "style.safetensors",
        random_lora_state_dict(layers["with_text_encoder"], rank=4, alpha=KOHYA_ALPHA, key_format="kohya", seed=1),
    )
    (root / "kohya-meta" / "metadata.json").write_text(json.dumps(KOHYA_METADATA))
    write_lora(
        root / "peft-plain" / "style.safetensors",
        random_lora_state_dict(layers["unet_only"], rank=8, key_format="peft", seed=2, dtype=torch.float16),
    )
    write_lora(
        root / "versioned" / "v1" / "style.safetensors",
        random_lora_state_dict(layers["with_text_encoder"], rank=4, key_format="peft", seed=3),
    )
    write_lora(
        root / "versioned" / "v2" / "style.safetensors",
        random_lora_state_dict(layers["unet_only"], rank=4, alpha=1.0, key_format="kohya", seed=4),
    )
    (root / "versioned" / "metadata.json").write_text(json.dumps(BRAND_METADATA))
    (root / "versioned" / "v2" / "metadata.json").write_text(json.dumps(V2_METADATA))
    for i, brand in enumerate(FILLERS):
        write_lora(root / brand / "style.safetensors", random_lora_state_dict(layers["small"], seed=10 + i))
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


def listed(api: TestClient, **params) -> dict[str, dict]:
    response = api.get("/lora/list", params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    return {entry["brand_id"]: entry for entry in response.json()["data"]}


# ---- /lora/list ------------------------------------------------------------------------------------

LIST_CASES = {
    "kohya-meta": dict(
        versions=["default"],
        latest="default",
        file="kohya-meta/style.safetensors",
        format="kohya",
        type="style",
        metadata_summary={
            k: KOHYA_METADATA[k] for k in ("type", "base_model", "training_steps", "version_notes", "trigger_words")
        },
    ),
    "peft-plain": dict(
        versions=["default"],
        latest="default",
        file="peft-plain/style.safetensors",
        format="peft",
        type=None,
        metadata_summary=None,
    ),
    "versioned": dict(
        versions=["v1", "v2"],
        latest="v2",
        file="versioned/v2/style.safetensors",
        format="kohya",
        type="style",
        metadata_summary={"type": "style", "version_notes": "v2: brighter palette"},
    ),
}


@pytest.mark.parametrize("brand", LIST_CASES)
def test_list_entry_describes_the_latest_file(api, lora_root, brand):
    entry = listed(api)[brand]
    expected = LIST_CASES[brand]
    path = lora_root / expected["file"]

    assert {key: entry[key] for key in expected} == expected
    assert entry["size_bytes"] == path.stat().st_size
    assert entry["sha256"] == sha256_of(path)
    assert entry["valid"] is True
    assert entry["invalid_reason"] is None


def test_list_has_every_brand_sorted_with_the_total_count(api):
    body = api.get("/lora/list").json()

    assert [entry["brand_id"] for entry in body["data"]] == ALL_BRANDS
    assert body["count"] == len(ALL_BRANDS) == 7
    assert (body["offset"], body["limit"]) == (0, 100)


def test_cached_becomes_true_after_a_request_uses_the_brand(api):
    before = listed(api)
    response = api.post(
        "/generate",
        json={
            "prompt": "a lamp",
            "width": 64,
            "height": 64,
            "num_inference_steps": 2,
            "seed": 3,
            "brand_id": "peft-plain",
        },
    )
    after = listed(api)

    assert response.status_code == 200, response.text
    assert response.json()["loras"][0]["brand_id"] == "peft-plain"
    assert before["peft-plain"]["cached"] is False
    assert after["peft-plain"]["cached"] is True
    assert after["kohya-meta"]["cached"] is False


def test_pages_cover_every_brand_once(api):
    pages = [api.get("/lora/list", params={"offset": offset, "limit": 3}).json() for offset in (0, 3, 6)]

    assert [[e["brand_id"] for e in page["data"]] for page in pages] == [
        ALL_BRANDS[0:3],
        ALL_BRANDS[3:6],
        ALL_BRANDS[6:7],
    ]
    assert all(page["count"] == 7 and page["limit"] == 3 for page in pages)
    assert [page["offset"] for page in pages] == [0, 3, 6]


def test_page_past_the_end_is_empty_with_the_total_count(api):
    body = api.get("/lora/list", params={"offset": 20, "limit": 5}).json()

    assert body["data"] == []
    assert body["count"] == 7


def test_limit_above_500_is_422(api):
    refused = api.get("/lora/list", params={"limit": 501})
    accepted = api.get("/lora/list", params={"limit": 500})

    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["query", "limit"]
    assert accepted.status_code == 200
    assert accepted.json()["count"] == 7


def test_sha256_is_computed_once_per_file_content(api, lora_root, layers, monkeypatch):
    hashed: Counter[str] = Counter()
    real_hash_file = file_facts_module._hash_file

    def counting_hash_file(path):
        hashed[os.path.realpath(path)] += 1
        return real_hash_file(path)

    monkeypatch.setattr(file_facts_module, "_hash_file", counting_hash_file)
    brand_dir = lora_root / "rehash"
    path = brand_dir / "style.safetensors"
    write_lora(path, random_lora_state_dict(layers["small"], seed=20))
    try:
        first = api.get("/lora/rehash/metadata").json()["file"]["sha256"]
        api.get("/lora/list")
        total_after_first_list = sum(hashed.values())
        again = api.get("/lora/rehash/metadata").json()["file"]["sha256"]
        listed_again = listed(api)["rehash"]["sha256"]

        assert first == again == listed_again == sha256_of(path)
        assert hashed[os.path.realpath(path)] == 1
        assert sum(hashed.values()) == total_after_first_list, "unchanged files must not be hashed again"

        # An upload replaces the file (written beside it under a hidden name, then renamed over it).
        upload = brand_dir / ".upload.safetensors"
        write_lora(upload, random_lora_state_dict(layers["small"], seed=21))
        os.replace(upload, path)
        changed = api.get("/lora/rehash/metadata").json()["file"]["sha256"]
        listed_changed = listed(api)["rehash"]["sha256"]

        assert changed == listed_changed == sha256_of(path)
        assert changed != first
        assert hashed[os.path.realpath(path)] == 2
    finally:
        shutil.rmtree(brand_dir)


# ---- /lora/{brand_id}/metadata -----------------------------------------------------------------------


def test_metadata_keeps_metadata_json_and_reads_kohya_file_facts(api, lora_root, layers):
    path = lora_root / "kohya-meta" / "style.safetensors"

    response = api.get("/lora/kohya-meta/metadata")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["metadata"] == KOHYA_METADATA
    assert (body["brand_id"], body["version"], body["versions"], body["latest"]) == (
        "kohya-meta",
        "default",
        ["default"],
        "default",
    )
    file = body["file"]
    assert file["path"] == "kohya-meta/style.safetensors"
    assert file["format"] == "kohya"
    assert file["rank"] == 4
    assert file["alpha"] == KOHYA_ALPHA
    assert file["target_modules"] == len(layers["with_text_encoder"])
    assert file["has_text_encoder"] is True
    assert file["dtype"] == "F32"
    assert file["size_bytes"] == path.stat().st_size
    assert file["sha256"] == sha256_of(path)
    assert file["valid"] is True


def test_metadata_of_an_f16_peft_file_without_metadata_json(api, lora_root, layers):
    body = api.get("/lora/peft-plain/metadata").json()

    file = body["file"]
    assert body["metadata"] is None
    assert body["metadata_error"] is None
    assert file["format"] == "peft"
    assert file["rank"] == 8
    assert file["target_modules"] == len(layers["unet_only"])
    assert file["has_text_encoder"] is False
    assert file["dtype"] == "F16"
    assert file["sha256"] == sha256_of(lora_root / "peft-plain" / "style.safetensors")


def test_metadata_defaults_to_the_latest_version(api, lora_root):
    body = api.get("/lora/versioned/metadata").json()

    assert (body["version"], body["versions"], body["latest"]) == ("v2", ["v1", "v2"], "v2")
    assert body["metadata"] == V2_METADATA
    assert body["file"]["path"] == "versioned/v2/style.safetensors"
    assert body["file"]["sha256"] == sha256_of(lora_root / "versioned" / "v2" / "style.safetensors")
    assert body["file"]["has_text_encoder"] is False


def test_metadata_version_query_selects_that_version(api, lora_root, layers):
    body = api.get("/lora/versioned/metadata", params={"version": "v1"}).json()

    assert (body["version"], body["latest"]) == ("v1", "v2")
    assert body["metadata"] == BRAND_METADATA, "v1 has no metadata.json of its own: the brand's is used"
    assert body["file"]["path"] == "versioned/v1/style.safetensors"
    assert body["file"]["sha256"] == sha256_of(lora_root / "versioned" / "v1" / "style.safetensors")
    assert body["file"]["format"] == "peft"
    assert body["file"]["has_text_encoder"] is True
    assert body["file"]["target_modules"] == len(layers["with_text_encoder"])


def test_metadata_of_an_unknown_brand_is_404_naming_it(api):
    response = api.get("/lora/no-such-brand/metadata")

    assert response.status_code == 404
    assert "no-such-brand" in response.json()["detail"]


def test_metadata_of_an_unknown_version_is_404_listing_the_versions(api):
    response = api.get("/lora/versioned/metadata", params={"version": "v9"})

    assert response.status_code == 404
    detail = response.json()["detail"]
    assert "v9" in detail and "v1, v2" in detail


@pytest.mark.parametrize("brand_id", ["-starts-with-dash", "has..dots", "a" * 65])
def test_metadata_of_an_invalid_brand_id_is_422(api, brand_id):
    response = api.get(f"/lora/{brand_id}/metadata")

    assert response.status_code == 422, response.text
