"""Property-based API test: schemathesis generates requests from the OpenAPI schema, valid and invalid,
for every operation; none may get a 5xx.

The app runs in-process (ASGI) with small bounds (128x128, 2 steps, 2 A/B variants) so that the requests
that pass validation generate images quickly. A demo brand exists so brand lookups can hit a real file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi

from app.config import Settings
from app.lora.synthetic import random_lora_state_dict, target_layers, write_lora
from app.main import create_app

_WORK = Path(tempfile.mkdtemp(prefix="schemathesis-"))
APP = create_app(
    Settings(
        lora_base_dir=_WORK / "loras",
        data_dir=_WORK / "data",
        max_width=128,
        max_height=128,
        max_steps=2,
        ab_max_variants=2,
        max_queue_size=64,
    )
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def ready_app():
    """Start the app's lifespan through schemathesis' own ASGI client, then wait for the model."""
    with asgi.get_client(APP) as client:
        assert client.get(f"http://{asgi.HOST}/health").status_code == 200
    state = APP.state.service_state
    assert state.wait_ready(120), state.load_error
    pipe = state.engine.pipe
    write_lora(
        Path(state.registry.root) / "acme" / "style.safetensors",
        random_lora_state_dict(target_layers(pipe.unet, pipe.text_encoder), rank=2, seed=1),
    )
    yield


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error])
