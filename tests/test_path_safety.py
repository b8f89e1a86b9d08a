"""A brand id can never reach a file outside the LoRA root: traversal ids in the body and in the URL are
refused, and symlinks inside the root that lead outside are refused without being loaded and without
revealing where they point.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.lora.synthetic import random_lora_state_dict, target_layers, write_lora
from app.main import create_app

REQUEST = {"prompt": "a red coffee cup", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 5}
TRAVERSAL_IDS = [
    "../x",
    "..",
    "../../etc/passwd",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "%2e%2e",
    "..%2F",
    "%2e%2e%2fetc%2fpasswd",
    "..%252F",
    "./acme",
    "acme/../acme",
    "acme\x00",
    "~root",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("paths")
    app = create_app(Settings(lora_base_dir=work / "loras", data_dir=work / "data", log_level="warning"))
    with TestClient(app) as c:
        state = app.state.service_state
        assert state.wait_ready(120), state.load_error
        root = Path(state.registry.root)
        outside = work / "outside"
        layers = target_layers(state.engine.pipe.unet, state.engine.pipe.text_encoder)
        write_lora(root / "acme" / "style.safetensors", random_lora_state_dict(layers, rank=2, seed=1))
        secret = write_lora(outside / "secret-brand" / "style.safetensors", random_lora_state_dict(layers, seed=2))
        (outside / "secret-brand" / "metadata.json").write_text('{"type": "secret"}')
        # A brand folder that is a symlink to a folder outside the root.
        os.symlink(outside / "secret-brand", root / "linked-dir")
        # A real brand folder whose LoRA file is a symlink to a file outside the root.
        (root / "linked-file").mkdir()
        os.symlink(secret, root / "linked-file" / "style.safetensors")
        # A version folder that is a symlink to a folder outside the root.
        (root / "linked-version").mkdir()
        os.symlink(outside / "secret-brand", root / "linked-version" / "v1")
        yield c, state, outside


def assert_refused(r, field: str) -> None:
    assert r.status_code == 422, r.text
    locs = [d["loc"] for d in r.json()["detail"]]
    assert any(field in loc for loc in locs), locs


@pytest.mark.parametrize("brand_id", TRAVERSAL_IDS)
def test_traversal_ids_in_the_body_are_refused(setup, brand_id):
    client, state, _ = setup
    assert_refused(client.post("/generate", json={**REQUEST, "brand_id": brand_id}), "brand_id")
    r = client.post("/generate", json={**REQUEST, "lora_configs": [{"brand_id": brand_id, "weight": 0.5}]})
    assert_refused(r, "brand_id")
    assert_refused(client.post("/generate", json={**REQUEST, "brand_id": "acme", "version": brand_id}), "version")
    assert state.loras.loads == 0


METADATA_PATHS = [
    "/lora/..%2Fetc/metadata",
    "/lora/%2e%2e/metadata",
    "/lora/%2e%2e%2f%2e%2e%2fetc%2fpasswd/metadata",
    "/lora/%2Fetc%2Fpasswd/metadata",
    "/lora/..%252F/metadata",
    "/lora/..%5C..%5Cetc/metadata",
    "/lora/acme%00/metadata",
    "/lora/acme/metadata?version=..%2F..%2Fetc",
    "/lora/acme/metadata?version=%2e%2e",
    "/lora/%2e%2e/ab-results",
    "/lora/..%2F..%2Fetc/ab-results",
]


@pytest.mark.parametrize("path", METADATA_PATHS)
def test_traversal_in_the_url_is_refused(setup, path):
    client, _, _ = setup
    r = client.get(path)
    assert r.status_code in (404, 422), r.text
    assert "root:" not in r.text and "secret" not in r.text


def _check_symlink_refused(setup, brand: str) -> None:
    client, state, outside = setup
    for body in ({**REQUEST, "brand_id": brand}, {**REQUEST, "brand_id": brand, "strict": True}):
        r = client.post("/generate", json=body)
        if r.status_code == 200:
            assert r.json()["loras"] == []
            assert any("outside" in w for w in r.json()["warnings"]), r.json()["warnings"]
        else:
            assert r.status_code == 422, r.text
            assert "outside" in r.json()["detail"][0]["msg"]
        assert str(outside) not in r.text and "secret" not in r.text
    r = client.get(f"/lora/{brand}/metadata")
    assert r.status_code in (404, 422), r.text
    assert str(outside) not in r.text and "secret" not in r.text
    listing = client.get("/lora/list")
    assert str(outside) not in listing.text and "secret" not in listing.text
    listed = {b["brand_id"]: b for b in listing.json()["data"]}
    assert brand not in listed or listed[brand]["valid"] is False
    assert state.loras.loads == 0 and state.loras.resident_adapters() == []


def test_symlinked_brand_folder_is_refused(setup):
    _check_symlink_refused(setup, "linked-dir")


def test_symlinked_file_is_refused(setup):
    _check_symlink_refused(setup, "linked-file")


def test_symlinked_version_folder_is_refused(setup):
    _check_symlink_refused(setup, "linked-version")
    client, _, outside = setup
    r = client.post("/generate", json={**REQUEST, "brand_id": "linked-version", "version": "v1"})
    assert r.status_code in (200, 422) and str(outside) not in r.text
    if r.status_code == 200:
        assert r.json()["loras"] == []


def test_the_real_brand_next_to_the_links_still_loads(setup):
    client, state, _ = setup
    r = client.post("/generate", json={**REQUEST, "brand_id": "acme"})
    assert r.status_code == 200, r.text
    assert [lora["file"] for lora in r.json()["loras"]] == ["acme/style.safetensors"]
    assert state.loras.resident_adapters() == ["acme"]
