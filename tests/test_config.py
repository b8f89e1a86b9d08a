"""Start-up configuration: bad environment values stop the service with a message naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.main import load_settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No project .env and none of the service's variables set, so each test sees only what it sets."""
    monkeypatch.chdir(tmp_path)
    for name in ("DEVICE", "DTYPE", "PORT", "MODEL_ID", "LORA_CACHE_MAX_SIZE", "LORA_PRELOAD_BRANDS", "LOG_LEVEL",
                 "LORA_CACHE_ENABLED", "MAX_QUEUE_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_bad_values_stop_the_process_naming_each_variable(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "LORA_CACHE_MAX_SIZE": "0",
        "DEVICE": "tpu",
        "PORT": "not-a-port",
    }
    result = subprocess.run(
        [sys.executable, "-c", "from app.main import load_settings; load_settings()"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode != 0
    assert "Invalid configuration" in result.stderr
    for variable in ("LORA_CACHE_MAX_SIZE", "DEVICE", "PORT"):
        assert variable in result.stderr
    assert "Traceback" not in result.stderr


BAD_VALUES = {
    "LORA_CACHE_MAX_SIZE": "0",
    "DEVICE": "tpu",
    "DTYPE": "float8",
    "PORT": "70000",
    "LOG_LEVEL": "loud",
    "LORA_CACHE_ENABLED": "maybe",
    "MODEL_ID": "   ",
    "MAX_QUEUE_SIZE": "-1",
}


@pytest.mark.parametrize("variable, value", BAD_VALUES.items(), ids=BAD_VALUES.keys())
def test_each_bad_value_is_named(clean_env, variable, value):
    clean_env.setenv(variable, value)

    with pytest.raises(SystemExit) as excinfo:
        load_settings()

    assert f"{variable}=" in str(excinfo.value.code)


@pytest.mark.parametrize("where", ["environment", ".env"])
def test_a_replaced_setting_stops_the_process_naming_its_replacement(clean_env, tmp_path, where):
    if where == "environment":
        clean_env.setenv("RAY_HOT_SHARE", "0.3")
    else:
        (tmp_path / ".env").write_text("RAY_HOT_SHARE=0.3\n")  # clean_env runs from tmp_path

    with pytest.raises(SystemExit) as excinfo:
        load_settings()

    assert "RAY_HOT_SHARE was replaced by RAY_HOT_MARGIN" in str(excinfo.value.code)


def test_float16_on_cpu_is_refused_with_both_variables_named(clean_env):
    clean_env.setenv("DEVICE", "cpu")
    clean_env.setenv("DTYPE", "float16")

    with pytest.raises(SystemExit) as excinfo:
        load_settings()

    message = str(excinfo.value.code)
    assert "DTYPE=float16" in message and "DEVICE=cpu" in message


def test_good_values_are_read_and_normalised(clean_env):
    clean_env.setenv("LORA_CACHE_MAX_SIZE", "3")
    clean_env.setenv("LORA_PRELOAD_BRANDS", " acme, globex ,,")
    clean_env.setenv("DEVICE", "cpu")

    settings = load_settings()

    assert settings.lora_cache_max_size == 3
    assert settings.preload_brands == ["acme", "globex"]
    assert settings.device == "cpu"


# ---- every entry point: one configuration, the same clean error ----------------------------------

BIN = Path(sys.executable).parent
ENTRY_POINTS = {
    "brand-image-service": [str(BIN / "brand-image-service")],
    "python -m app.main": [sys.executable, "-m", "app.main"],
    "uvicorn app.main:app": [sys.executable, "-m", "uvicorn", "app.main:app"],
    "python -m app.demo": [sys.executable, "-m", "app.demo"],
    "brand-image-serve (Ray Serve)": [str(BIN / "brand-image-serve")],
    "python -m app.train": [sys.executable, "-m", "app.train", "--brand", "acme", "--data", "."],
}


def _service_env() -> dict[str, str]:
    """The environment without any of the service's variables, so only the test's .env sets them."""
    from app.config import Settings

    names = {name.upper() for name in Settings.model_fields}
    return {k: v for k, v in os.environ.items() if k not in names} | {"PYTHONPATH": str(PROJECT_ROOT)}


@pytest.mark.parametrize("command", ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys())
def test_every_entry_point_stops_on_a_bad_dot_env_with_the_clean_message(tmp_path, command):
    (tmp_path / ".env").write_text("LORA_CACHE_MAX_SIZE=0\nPORT=not-a-port\n")

    result = subprocess.run(command, cwd=tmp_path, env=_service_env(), capture_output=True, text=True, timeout=120)

    assert result.returncode != 0
    assert "Invalid configuration" in result.stderr, result.stderr[-2000:]
    assert "LORA_CACHE_MAX_SIZE" in result.stderr and "PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_script_stops_on_a_bad_setting_with_the_clean_message():
    env = _service_env() | {"PORT": "70000"}

    result = subprocess.run(
        ["bash", str(PROJECT_ROOT / "scripts" / "serve.sh")], env=env, capture_output=True, text=True, timeout=600
    )

    assert result.returncode != 0
    assert "Invalid configuration" in result.stderr and "PORT" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_console_command_serves_on_host_and_port_from_dot_env(tmp_path):
    import httpx

    from tests.conftest import free_port

    port = free_port()
    (tmp_path / ".env").write_text(
        f"HOST=127.0.0.1\nPORT={port}\nDEVICE=cpu\nLOG_LEVEL=warning\nLORA_BASE_DIR={tmp_path / 'loras'}\n"
    )
    process = subprocess.Popen(
        [str(BIN / "brand-image-service")], cwd=tmp_path, env=_service_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "the service exited"
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"nothing answered on port {port} from .env"
                time.sleep(0.25)
        assert response.json() == {"status": "ok"}
    finally:
        process.terminate()
        process.wait(30)
