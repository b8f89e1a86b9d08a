"""Optional bearer keys: API_KEY guards the API, ADMIN_API_KEY guards clearing the cache; /health and
/ready stay open; with no keys set everything is open.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

USER_KEY = "user-key-123"
ADMIN_KEY = "admin-key-456"
REQUEST = {"prompt": "a red coffee cup", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 5}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _client(tmp_path_factory, **keys):
    work = tmp_path_factory.mktemp("auth")
    app = create_app(Settings(lora_base_dir=work / "loras", data_dir=work / "data", log_level="warning", **keys))
    client = TestClient(app)
    client.__enter__()
    state = app.state.service_state
    assert state.wait_ready(120), state.load_error
    return client


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    client = _client(tmp_path_factory, api_key=USER_KEY, admin_api_key=ADMIN_KEY)
    yield client
    client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def open_client(tmp_path_factory):
    client = _client(tmp_path_factory)
    yield client
    client.__exit__(None, None, None)


@pytest.mark.parametrize(
    ("headers", "status", "says"),
    [
        ({}, 401, "missing API key"),
        (bearer("wrong"), 401, "wrong API key"),
        (bearer(USER_KEY + "x"), 401, "wrong API key"),
        (bearer(USER_KEY[:-1]), 401, "wrong API key"),
        ({"Authorization": USER_KEY}, 401, "missing API key"),  # no "Bearer" scheme
        ({"Authorization": f"Basic {USER_KEY}"}, 401, "missing API key"),
        ({"Authorization": "Bearer "}, 401, "missing API key"),
        ({"X-API-Key": USER_KEY}, 401, "missing API key"),
    ],
    ids=["missing", "wrong", "longer", "shorter", "no-scheme", "basic", "empty-bearer", "other-header"],
)
def test_generate_without_the_right_key_is_401(keyed, headers, status, says):
    r = keyed.post("/generate", json=REQUEST, headers=headers)
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/lora/list"), ("GET", "/lora/cache/stats"), ("GET", "/metrics"),
     ("GET", "/lora/acme/metadata"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/nope")],
)
def test_every_other_endpoint_needs_the_key(keyed, method, path):
    assert keyed.request(method, path).status_code == 401
    assert keyed.request(method, path, headers=bearer("wrong")).status_code == 401
    assert keyed.request(method, path, headers=bearer(USER_KEY)).status_code != 401


def test_right_key_generates(keyed):
    r = keyed.post("/generate", json=REQUEST, headers=bearer(USER_KEY))
    assert r.status_code == 200, r.text
    assert r.json()["width"] == 64
    scheme_case = keyed.post("/generate", json=REQUEST, headers={"Authorization": f"bearer {USER_KEY}"})
    assert scheme_case.status_code == 200
    assert scheme_case.json()["image"] == r.json()["image"]


def test_admin_key_also_works_on_user_endpoints(keyed):
    assert keyed.get("/lora/cache/stats", headers=bearer(ADMIN_KEY)).status_code == 200


def test_health_and_ready_are_open(keyed):
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/ready").status_code == 200
    assert keyed.get("/ready", headers=bearer("wrong")).status_code == 200


def test_cache_clear_needs_the_admin_key(keyed):
    missing = keyed.post("/lora/cache/clear")
    assert missing.status_code == 401 and "missing API key" in missing.json()["detail"]
    assert keyed.post("/lora/cache/clear", headers=bearer("wrong")).status_code == 401
    user = keyed.post("/lora/cache/clear", headers=bearer(USER_KEY))
    assert user.status_code == 403 and "needs the 'admin' role; key 'API_KEY'" in user.json()["detail"]
    admin = keyed.post("/lora/cache/clear", headers=bearer(ADMIN_KEY))
    assert admin.status_code == 200 and admin.json() == {"cleared": 0}


def test_refusals_never_echo_a_key(keyed):
    r = keyed.post("/lora/cache/clear", headers=bearer(USER_KEY))
    assert USER_KEY not in r.text and ADMIN_KEY not in r.text
    r = keyed.get("/", headers=bearer(USER_KEY))
    assert USER_KEY not in r.text and ADMIN_KEY not in r.text


def test_admin_key_alone_guards_only_the_cache_clear(tmp_path_factory):
    client = _client(tmp_path_factory, admin_api_key=ADMIN_KEY)
    try:
        assert client.post("/generate", json=REQUEST).status_code == 200
        assert client.get("/lora/list").status_code == 200
        assert client.post("/lora/cache/clear").status_code == 401
        assert client.post("/lora/cache/clear", headers=bearer("wrong")).status_code == 401
        assert client.post("/lora/cache/clear", headers=bearer(ADMIN_KEY)).status_code == 200
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/generate", REQUEST), ("GET", "/lora/list", None), ("GET", "/lora/cache/stats", None),
     ("POST", "/lora/cache/clear", None), ("GET", "/metrics", None), ("GET", "/", None), ("GET", "/ready", None)],
)
def test_no_keys_means_everything_is_open(open_client, method, path, body):
    r = open_client.request(method, path, json=body)
    assert r.status_code == 200, r.text
    r = open_client.request(method, path, json=body, headers=bearer("anything"))
    assert r.status_code == 200, r.text
