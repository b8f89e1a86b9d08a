"""Property-based API test: schemathesis generates requests from the OpenAPI schema, valid and invalid,
for every operation; none may get a 5xx. Then two app-lifecycle cases that the run uncovered.

The app runs in-process (ASGI) with small bounds (128x128, 2 steps, 2 A/B variants) so that the requests
that pass validation generate images quickly. A demo brand exists so brand lookups can hit a real file.

The lifespan runs once, in a TestClient held for the module, and schemathesis sends through an ASGI
session that does not own it: schemathesis' pytest plugin otherwise ends the lifespan after every
operation and restarts it on the next, which reloads the model each time (see the tests at the end).
The schema comes from `app.openapi()`: `from_asgi` would start the lifespan at import, during collection.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi

from app.config import Settings
from app.lora.synthetic import random_lora_state_dict, target_layers, write_lora
from app.main import create_app

_WORK = Path(tempfile.mkdtemp(prefix="schemathesis-"))
APP = create_app(  # cheap: nothing loads until the lifespan starts
    Settings(
        lora_base_dir=_WORK / "loras",
        data_dir=_WORK / "data",
        log_level="warning",
        max_width=128,
        max_height=128,
        max_steps=2,
        ab_max_variants=2,
        max_queue_size=64,
    )
)
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP  # calls go to the app in-process (what from_asgi sets)
schema.config.generation.update(modes=list(GenerationMode))  # schema-valid and schema-invalid data
SESSION = asgi.ASGIClient(APP)  # never entered: it does not start or own the lifespan


@pytest.fixture(scope="module")
def running_app():
    with TestClient(APP):
        state = APP.state.service_state
        assert state.wait_ready(120), state.load_error
        pipe = state.engine.pipe
        write_lora(
            Path(state.registry.root) / "acme" / "style.safetensors",
            random_lora_state_dict(target_layers(pipe.unet, pipe.text_encoder), rank=2, seed=1),
        )
        yield


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(running_app, case):
    case.call_and_validate(session=SESSION, checks=[not_a_server_error])


def _app(tmp_path: Path, name: str):
    return create_app(Settings(lora_base_dir=tmp_path / name / "loras", data_dir=tmp_path / name / "data",
                               log_level="error"))


def test_a_restarted_lifespan_keeps_the_model_and_the_ab_store(tmp_path):
    """Found by schemathesis (its plugin restarts the lifespan per operation): after a second start the
    A/B endpoints answered 500 "Cannot operate on a closed database" and the model was loaded again."""
    app = _app(tmp_path, "restart")
    state = app.state.service_state
    with TestClient(app, raise_server_exceptions=False) as c:
        assert state.wait_ready(120), state.load_error
        engine = state.engine
        assert c.post("/ab-test/abc/choice", json={"variant": 0}).status_code == 404
    with TestClient(app, raise_server_exceptions=False) as c:
        assert state.wait_ready(120), state.load_error
        assert c.post("/ab-test/abc/choice", json={"variant": 0}).status_code == 404
        assert c.get("/ab-test/abc").status_code == 404
        assert state.engine is engine, "the model was loaded a second time"
        r = c.post("/generate", json={"prompt": "a cup", "width": 64, "height": 64, "num_inference_steps": 1})
        assert r.status_code == 200, r.text


def test_two_apps_starting_at_once_both_load(tmp_path):
    """Two model loads in one process at the same time: one failed ("Cannot copy out of meta tensor", or
    "cannot import name 'StableDiffusionPipeline'") and that app answered 503 for good."""
    apps = [_app(tmp_path, "a"), _app(tmp_path, "b")]
    barrier = threading.Barrier(2)

    def start(app):
        barrier.wait()
        app.state.service_state.load()

    threads = [threading.Thread(target=start, args=(app,)) for app in apps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert [app.state.service_state.load_error for app in apps] == [None, None]
    assert all(app.state.service_state.ready for app in apps)
