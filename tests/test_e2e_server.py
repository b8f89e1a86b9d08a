"""The real server: uvicorn in a subprocess, configured by environment variables, over real HTTP."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from tests.conftest import decode_png, free_port, small_request


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


@pytest.mark.slow
def test_a_start_prints_no_torchvision_fallback_warning(tmp_path):
    """`brand-image-service`, started as a user starts it, loads the model without transformers' lines about
    torchvision (image processors falling back to PIL: the pipeline uses none)."""
    port = free_port()
    env = {
        **os.environ, "PORT": str(port), "LORA_BASE_DIR": str(tmp_path / "loras"), "DATA_DIR": str(tmp_path / "data"),
        "MODEL_CACHE_DIR": str(Settings.model_fields["model_cache_dir"].default), "LOG_LEVEL": "info",
    }  # fmt: skip
    command = [str(Path(sys.executable).with_name("brand-image-service"))]
    with open(tmp_path / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 180  # a hang guard: the wait is on /ready
            while not _ready(f"http://127.0.0.1:{port}/ready"):
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.log").read_text()
                time.sleep(0.25)
        finally:
            process.terminate()
            process.wait(30)

    log = (tmp_path / "stderr.log").read_text(errors="replace")
    assert "app.state: ready" in log  # the model was loaded: the point where transformers warned
    assert "torchvision" not in log, log


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
