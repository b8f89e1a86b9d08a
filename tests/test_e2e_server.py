"""The real server: uvicorn in a subprocess, configured by environment variables, over real HTTP."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import decode_png, small_request

PROJECT_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, model_cache_dir, model_dir, make_brand):
    lora_dir = tmp_path / "loras"
    lora_file = make_brand(lora_dir, "acme", seed=41)
    port = free_port()
    env = {
        **os.environ,
        "MODEL_CACHE_DIR": str(model_cache_dir),
        "LORA_BASE_DIR": str(lora_dir),
        "LOG_LEVEL": "warning",
        "DEVICE": "cpu",
        "DTYPE": "float32",
        "LORA_PRELOAD_BRANDS": "acme",
    }
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,  # so no project .env is read; PYTHONPATH below finds the app
        env={**env, "PYTHONPATH": str(PROJECT_ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"the server exited: {(tmp_path / 'server.log').read_text()}"
            try:
                if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.5)
        yield base_url, lora_file
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    assert process.returncode is not None


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
