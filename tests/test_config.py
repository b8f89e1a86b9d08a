"""Start-up configuration: bad environment values stop the service with a message naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
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
