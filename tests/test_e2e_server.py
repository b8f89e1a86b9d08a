"""The real server: uvicorn in a subprocess, configured by environment variables, over real HTTP."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.conftest import decode_png, small_request


@pytest.fixture
def server(tmp_path, start_server, make_brand):
    lora_file = make_brand(tmp_path / "loras", "acme", seed=41)
    running = start_server(tmp_path, LORA_PRELOAD_BRANDS="acme")
    yield running.url, lora_file


@pytest.mark.slow
def test_server_generates_over_real_http_with_and_without_a_brand(server, expected_png):
    base_url, lora_file = server

    ready = httpx.get(f"{base_url}/ready", timeout=10).json()
    assert ready == {"status": "ready", "preload": {"acme": None}}
    plain = httpx.post(f"{base_url}/generate", json=small_request(seed=3), timeout=120)
    branded = httpx.post(f"{base_url}/generate", json=small_request(seed=3, brand_id="acme"), timeout=120)
    invalid = httpx.post(f"{base_url}/generate", json=small_request(width="64"), timeout=30)

    assert plain.status_code == 200 and branded.status_code == 200
    assert decode_png(plain.json()["image"]).size == (64, 64)
    assert base64.b64decode(plain.json()["image"]) == expected_png(None, seed=3)
    assert base64.b64decode(branded.json()["image"]) == expected_png(lora_file, 0.8, seed=3)
    assert branded.json()["loras"][0]["brand_id"] == "acme"
    assert invalid.status_code == 422
    stats = httpx.get(f"{base_url}/lora/cache/stats", timeout=10).json()
    assert (stats["cached"], stats["hits"], stats["misses"]) == (["acme"], 1, 0)
