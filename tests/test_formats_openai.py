"""POST /v1/images/generations, with the official `openai` client against a real server."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest
from openai import OpenAI

from app.errors import QueueFull
from tests.conftest import small_request


@pytest.fixture(scope="module")
def api(make_client, tmp_path_factory, make_brand):
    root = tmp_path_factory.mktemp("openai-loras")
    make_brand(root, "acme", seed=11)
    with make_client(root) as c:
        yield c


def post(api, **fields):
    return api.post("/v1/images/generations", json={"prompt": "a red coffee cup", "size": "64x64",
                                                    "num_inference_steps": 2, **fields})  # fmt: skip


@pytest.mark.slow
def test_openai_client_against_a_real_server(tmp_path, start_server, make_brand):
    make_brand(tmp_path / "loras", "acme", seed=41)
    server = start_server(tmp_path)
    client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

    result = client.images.generate(
        prompt="a red coffee cup <lora:acme:0.5>", n=2, size="64x64", extra_body={"seed": 3, "num_inference_steps": 2}
    )

    assert isinstance(result.created, int) and len(result.data) == 2
    for i, image in enumerate(result.data):
        same = httpx.post(f"{server.url}/generate", timeout=120, json=small_request(
            prompt="a red coffee cup <lora:acme:0.5>", seed=3 + i, width=64, height=64, num_inference_steps=2))
        assert same.status_code == 200
        assert base64.b64decode(image.b64_json) == base64.b64decode(same.json()["image"])  # byte-identical PNG
    assert result.data[0].b64_json != result.data[1].b64_json

    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="a cup", size="100x64", extra_body={"num_inference_steps": 2})
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == "size" and refused.value.body["type"] == "invalid_request_error"

    with pytest.raises(openai.BadRequestError) as url:
        client.images.generate(prompt="a cup", size="64x64", response_format="url")
    assert url.value.body["param"] == "response_format" and "b64_json" in url.value.body["message"]


def test_openai_client_authentication_error_with_api_key(tmp_path, start_server):
    server = start_server(tmp_path, API_KEY="secret")
    with pytest.raises(openai.AuthenticationError) as denied:
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="a cup")
    assert denied.value.status_code == 401
    assert denied.value.body["code"] == "invalid_api_key" and denied.value.body["message"] == "wrong API key"

    ok = OpenAI(base_url=server.url + "/v1", api_key="secret", max_retries=0).images.generate(
        prompt="a cup", size="64x64", extra_body={"num_inference_steps": 1, "seed": 1})
    assert len(ok.data) == 1


ERRORS = {
    "size not WxH": ({"size": "big"}, "size"),
    "size not a multiple of 8": ({"size": "100x64"}, "size"),
    "size above MAX_WIDTH": ({"size": "2048x64"}, "size"),
    "n above 8": ({"n": 9}, "n"),
    "n zero": ({"n": 0}, "n"),
    "unknown parameter": ({"colour": "red"}, "colour"),
    "missing prompt": ({"prompt": None}, "prompt"),
    "unknown scheduler": ({"scheduler": "heun"}, "scheduler"),
    "weight above 1": ({"brand_id": "acme", "lora_weights": 2}, "lora_weights"),
    "bad prompt tag": ({"prompt": "a cup <lora:acme:2>"}, "prompt"),
    "brand twice": ({"prompt": "a cup <lora:acme>", "brand_id": "acme"}, "prompt"),
    "seed + n beyond the maximum": ({"seed": 2**32 - 1, "n": 2}, "seed"),
    "url response": ({"response_format": "url"}, "response_format"),
    "steps above the maximum": ({"num_inference_steps": 101}, "num_inference_steps"),
}


@pytest.mark.parametrize("fields, param", ERRORS.values(), ids=ERRORS.keys())
def test_errors_have_openais_shape_and_name_the_parameter(api, fields, param):
    body = {k: v for k, v in fields.items() if v is not None}
    if fields.get("prompt", "") is None:
        response = api.post("/v1/images/generations", json={"size": "64x64"})
    else:
        response = post(api, **body)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert error["message"]


def test_not_json_is_400(api):
    response = api.post("/v1/images/generations", content=b"prompt=x", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_seed_i_equals_generate_and_extra_fields_pass_through(api):
    response = post(api, n=2, seed=10, scheduler="euler", brand_id="acme", lora_weights=0.5, negative_prompt="dark")
    assert response.status_code == 200, response.text
    data = response.json()["data"]

    for i, item in enumerate(data):
        same = api.post("/generate", json=small_request(
            prompt="a red coffee cup", seed=10 + i, scheduler="euler", brand_id="acme", lora_weights=0.5,
            negative_prompt="dark"))  # fmt: skip
        assert item["b64_json"] == same.json()["image"]


def test_model_and_user_are_accepted_and_ignored(api):
    plain = post(api, seed=1).json()["data"]
    tagged = post(api, seed=1, model="dall-e-3", user="dana").json()["data"]
    assert plain == tagged


def test_full_queue_is_429_in_openais_shape(api, monkeypatch):
    queue = api.app.state.service_state.queue

    def full():
        raise QueueFull(16, 3)

    monkeypatch.setattr(queue, "reserve", full)
    response = post(api, seed=1)

    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert response.headers["retry-after"]
