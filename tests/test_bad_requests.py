"""Bad requests to every endpoint: each gets a 4xx (never a 5xx) whose message names the culprit field,
and the service keeps answering good requests afterwards.

One app serves the whole module, with small limits so the limit checks are cheap to reach:
MAX_WIDTH/HEIGHT=256, MAX_PIXELS=128*128, MAX_STEPS=10, MAX_BODY_BYTES=4096, LORA_MAX_PER_REQUEST=2.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.lora.synthetic import random_lora_state_dict, target_layers, write_lora
from app.main import create_app

MAX_BODY_BYTES = 4096
MAX_IMAGE_BODY_BYTES = 256 * 1024  # /generate may carry images
LIMITS = dict(
    max_image_body_bytes=MAX_IMAGE_BODY_BYTES,
    max_width=256,
    max_height=256,
    max_pixels=128 * 128,
    max_steps=10,
    max_body_bytes=MAX_BODY_BYTES,
    lora_max_per_request=2,
)
GOOD = {"prompt": "a red coffee cup", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 3}
JSON = {"content-type": "application/json"}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _image_b64(size: tuple[int, int], fmt: str = "PNG", mode: str = "RGB", color=255) -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt)
    return _b64(buffer.getvalue())


def edit(**changes) -> dict:
    """A good request with image-editing fields (4 steps: strength 0.75 leaves 3)."""
    return good(num_inference_steps=4, **changes)


def good(**changes) -> dict:
    """The good request with fields changed; a value of ... removes the field."""
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not ...}


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    work = tmp_path_factory.mktemp("bad-requests")
    app = create_app(Settings(lora_base_dir=work / "loras", data_dir=work / "data", log_level="warning", **LIMITS))
    with TestClient(app) as c:
        state = app.state.service_state
        assert state.wait_ready(120), state.load_error
        pipe = state.engine.pipe
        layers = target_layers(pipe.unet, pipe.text_encoder)
        write_lora(Path(state.registry.root) / "acme" / "style.safetensors", random_lora_state_dict(layers, seed=1))
        yield c


@dataclass(frozen=True)
class Bad:
    """One bad request: what is sent, the status expected, and a word the error must contain."""

    name: str
    names: str  # the field (or word) the error must name, in `loc` or in the message
    json: object = None  # a JSON body (sent with json=)
    raw: bytes | None = None  # or raw bytes (sent as is)
    headers: dict = field(default_factory=dict)
    method: str = "POST"
    path: str = "/generate"
    status: int = 422


def _configs(*brands: str) -> list[dict]:
    return [{"brand_id": b, "weight": 0.5} for b in brands]


BAD_REQUESTS = [
    # prompt
    Bad("missing prompt", "prompt", good(prompt=...)),
    Bad("empty prompt", "prompt", good(prompt="")),
    Bad("whitespace prompt", "prompt", good(prompt="  \t\n ")),
    Bad("prompt over 2000 chars", "prompt", good(prompt="x" * 2001)),
    Bad("prompt null", "prompt", good(prompt=None)),
    Bad("prompt a number", "prompt", good(prompt=42)),
    Bad("negative_prompt over 2000 chars", "negative_prompt", good(negative_prompt="y" * 2001)),
    # size
    Bad("width not a multiple of 8", "width", good(width=100)),
    Bad("height not a multiple of 8", "height", good(height=68)),
    Bad("width below 64", "width", good(width=56)),
    Bad("height below 64", "height", good(height=0)),
    Bad("width above MAX_WIDTH", "width", good(width=512)),
    Bad("height above MAX_HEIGHT", "height", good(height=264)),
    Bad("width*height above MAX_PIXELS", "pixels", good(width=256, height=256)),
    Bad("width far above MAX_WIDTH", "maximum of 256 (MAX_WIDTH)", good(width=8192)),
    # steps, guidance, seed
    Bad("steps 0", "num_inference_steps", good(num_inference_steps=0)),
    Bad("steps above MAX_STEPS", "num_inference_steps", good(num_inference_steps=11)),
    Bad("steps 101", "num_inference_steps", good(num_inference_steps=101)),
    Bad("guidance -1", "guidance_scale", good(guidance_scale=-1)),
    Bad("guidance 31", "guidance_scale", good(guidance_scale=31)),
    Bad("guidance NaN", "guidance_scale", raw=b'{"prompt": "x", "width": 64, "height": 64, "guidance_scale": NaN}'),
    Bad("guidance Infinity", "guidance_scale", raw=b'{"prompt": "x", "guidance_scale": Infinity}'),
    Bad("lora_weights -Infinity", "lora_weights", raw=b'{"prompt": "x", "brand_id": "a", "lora_weights": -Infinity}'),
    Bad("prompt with a lone surrogate", "prompt", raw=b'{"prompt": "a\\ud800b"}'),
    Bad("brand_id with a lone surrogate", "brand_id", raw=b'{"prompt": "x", "brand_id": "\\udfff"}'),
    Bad("seed -1", "seed", good(seed=-1)),
    Bad("seed 2**32", "seed", good(seed=2**32)),
    Bad("seed a float", "seed", good(seed=1.5)),
    # types: strict, no coercion
    Bad("width a string", "width", good(width="64")),
    Bad("steps a string", "num_inference_steps", good(num_inference_steps="2")),
    Bad("guidance a string", "guidance_scale", good(guidance_scale="7.5")),
    Bad("width a bool", "width", good(width=True)),
    Bad("guidance a bool", "guidance_scale", good(guidance_scale=False)),
    Bad("strict a string", "strict", good(strict="yes")),
    Bad("unknown field", "sampler", good(sampler="euler")),
    Bad("misspelt field", "num_steps", good(num_steps=2)),
    # body shape
    Bad("malformed JSON", "JSON", raw=b'{"prompt": "x", '),
    Bad("JSON array body", "array, not an object", raw=b'[{"prompt": "x"}]'),
    Bad("JSON string body", "string, not an object", raw=b'"a red cup"'),
    Bad("JSON null body", "null, not an object", raw=b"null"),
    Bad("empty body", "body", raw=b""),
    Bad("wrong content type", "body", raw=json.dumps(GOOD).encode(), headers={"content-type": "text/plain"}),
    Bad("form-encoded body", "body", raw=b"prompt=a", headers={"content-type": "application/x-www-form-urlencoded"}),
    # LoRA fields
    Bad("lora_weights above 1", "lora_weights", good(brand_id="acme", lora_weights=1.5)),
    Bad("lora_weights below 0", "lora_weights", good(brand_id="acme", lora_weights=-0.1)),
    Bad("lora_configs weight above 1", "weight", good(lora_configs=[{"brand_id": "acme", "weight": 2}])),
    Bad("lora_configs duplicate brand", "lora_configs", good(lora_configs=_configs("acme", "acme"))),
    Bad("brand_id repeated in lora_configs", "brand_id", good(brand_id="acme", lora_configs=_configs("acme"))),
    Bad("more than LORA_MAX_PER_REQUEST", "lora_configs", good(lora_configs=_configs("a", "b", "c"))),
    Bad("lora_configs an object", "lora_configs", good(lora_configs={"brand_id": "acme"})),
    Bad("lora_configs a list of strings", "lora_configs", good(lora_configs=["acme"])),
    Bad("lora_configs item without brand_id", "brand_id", good(lora_configs=[{"weight": 0.5}])),
    Bad("lora_configs item with unknown field", "scale", good(lora_configs=[{"brand_id": "acme", "scale": 1}])),
    Bad("lora_configs over 64 items", "lora_configs", good(lora_configs=_configs(*(f"b{i}" for i in range(65))))),
    Bad("brand_id with a slash", "brand_id", good(brand_id="a/b")),
    Bad("brand_id with a space", "brand_id", good(brand_id="a b")),
    Bad("brand_id starting with a dot", "brand_id", good(brand_id=".hidden")),
    Bad("brand_id of 65 chars", "brand_id", good(brand_id="a" * 65)),
    Bad("brand_id a number", "brand_id", good(brand_id=7)),
    Bad("version with a slash", "version", good(brand_id="acme", version="v1/x")),
    Bad("version not vN", "version", good(brand_id="acme", version="latest")),
    Bad("version without brand_id", "version", good(version="v1")),
    # body size
    Bad(
        "body over MAX_BODY_BYTES with Content-Length",
        "limit",
        {"prompt": "x" * (MAX_BODY_BYTES + 10)},
        path="/ab-test",
        status=413,
    ),
    Bad("generate body over MAX_IMAGE_BODY_BYTES", "limit", good(prompt="x" * (MAX_IMAGE_BODY_BYTES + 10)), status=413),
    # image editing
    Bad("init_image not base64", "init_image", edit(init_image="not base64!")),
    Bad("init_image not an image", "init_image", edit(init_image=_b64(b"hello, not an image"))),
    Bad("init_image a GIF", "init_image", edit(init_image=_image_b64((8, 8), "GIF"))),
    Bad("init_image over MAX_PIXELS", "init_image", edit(init_image=_image_b64((200, 200)))),
    Bad("init_image a decompression bomb", "decompression bomb", edit(init_image=_image_b64((20000, 20000), mode="1"))),
    Bad("init_image declaring too many pixels", "pixels", edit(init_image=_image_b64((4200, 4200), mode="1"))),
    Bad(
        "mask_image of another size",
        "mask_image",
        edit(init_image=_image_b64((64, 64)), mask_image=_image_b64((32, 32), mode="L")),
    ),
    Bad(
        "mask_image black everywhere",
        "mask_image",
        edit(init_image=_image_b64((64, 64)), mask_image=_image_b64((64, 64), mode="L", color=0)),
    ),
    Bad("mask_image not an image", "mask_image", edit(init_image=_image_b64((64, 64)), mask_image=_b64(b"nope"))),
    Bad("mask_image without init_image", "init_image", edit(mask_image=_image_b64((64, 64), mode="L"))),
    Bad("strength above 1", "strength", edit(init_image=_image_b64((64, 64)), strength=1.5)),
    Bad("strength leaving no step", "strength", edit(init_image=_image_b64((64, 64)), strength=0.2)),
    Bad("mask_blur negative", "mask_blur", edit(init_image=_image_b64((64, 64)), mask_blur=-1)),
    # other endpoints
    Bad("list limit 0", "limit", method="GET", path="/lora/list?limit=0"),
    Bad("list limit 501", "limit", method="GET", path="/lora/list?limit=501"),
    Bad("list offset -1", "offset", method="GET", path="/lora/list?offset=-1"),
    Bad("list limit not a number", "limit", method="GET", path="/lora/list?limit=ten"),
    Bad("metadata brand with a space", "brand_id", method="GET", path="/lora/a%20b/metadata"),
    Bad("metadata version not an id", "version", method="GET", path="/lora/acme/metadata?version=v1%2Fx"),
    Bad("metadata of an unknown brand", "nope", method="GET", path="/lora/nope/metadata", status=404),
    Bad("metadata of an unknown version", "versions", method="GET", path="/lora/acme/metadata?version=v9", status=404),
    Bad("cache clear with GET", "Method", method="GET", path="/lora/cache/clear", status=405),
    Bad("generate with GET", "Method", method="GET", path="/generate", status=405),
    Bad("ab-test with neither variants nor grid", "variants", {"prompt": "x"}, path="/ab-test"),
    Bad(
        "ab-test grid weight above 1",
        "weights",
        {"prompt": "x", "grid": [{"brand_id": "acme", "weights": [2]}]},
        path="/ab-test",
    ),
    Bad("ab choice variant -1", "variant", {"variant": -1}, path="/ab-test/abc/choice"),
    Bad("ab choice for an unknown test", "abc", {"variant": 0}, path="/ab-test/abc/choice", status=404),
    Bad("ab-results of a bad brand", "brand_id", method="GET", path="/lora/..a/ab-results"),
]


def _error_text(body) -> str:
    """Every loc and message of an error body, as one string to search."""
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, list):
        return " ".join(" ".join(map(str, d.get("loc", []))) + " " + str(d.get("msg", "")) for d in detail)
    return str(detail)


def send(client: TestClient, bad: Bad):
    kwargs = {"headers": {**JSON, **bad.headers}} if bad.raw is not None else {}
    if bad.raw is not None:
        kwargs["content"] = bad.raw
    elif bad.json is not None:
        kwargs["json"] = bad.json
    return client.request(bad.method, bad.path, **kwargs)


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=[b.name for b in BAD_REQUESTS])
def test_bad_request_is_refused_with_the_field_named(client: TestClient, bad: Bad):
    r = send(client, bad)
    assert r.status_code == bad.status, r.text
    assert bad.names.lower() in _error_text(r.json()).lower(), r.text
    assert "Traceback" not in r.text


def test_body_over_the_limit_without_content_length_is_413(client: TestClient):
    """A chunked upload (no Content-Length) is counted as it arrives and refused past the limit."""

    def chunks():
        yield b'{"prompt": "'
        for _ in range(MAX_IMAGE_BODY_BYTES // 1000 + 2):
            yield b"x" * 1000
        yield b'"}'

    r = client.post("/generate", content=chunks(), headers=JSON)
    assert "content-length" not in r.request.headers
    assert r.status_code == 413, r.text
    assert "limit" in r.json()["detail"]


def test_chunked_body_under_the_limit_is_accepted(client: TestClient):
    payload = json.dumps(GOOD).encode()
    r = client.post("/generate", content=iter([payload[:10], payload[10:]]), headers=JSON)
    assert r.status_code == 200, r.text


def test_nan_is_reported_without_breaking_the_error_body(client: TestClient):
    """The 422 for a raw NaN is valid JSON (no bare NaN echoed back)."""
    r = client.post("/generate", content=b'{"prompt": "x", "guidance_scale": NaN}', headers=JSON)
    assert r.status_code == 422
    json.loads(r.text)  # strict parse: raises on a bare NaN
    assert r.json()["detail"][0]["loc"] == ["body", "guidance_scale"]


def test_a_lone_surrogate_is_echoed_escaped_in_a_valid_utf8_body(client: TestClient):
    """Invalid unicode from the client must not turn the 422 into a 500 when the reply is encoded."""
    r = client.post("/generate", content=b'{"prompt": "\\ud800"}', headers=JSON)
    assert r.status_code == 422
    r.content.decode("utf-8")  # strict decode
    assert r.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert r.json()["detail"][0]["input"] == "\\ud800"


def test_good_requests_still_succeed_and_nothing_was_a_server_error(client: TestClient):
    r = client.post("/generate", json=GOOD)
    assert r.status_code == 200, r.text
    assert r.json()["width"] == 64 and r.json()["warnings"] == []
    r = client.post("/generate", json=good(brand_id="acme"))
    assert r.status_code == 200, r.text
    assert [lora["brand_id"] for lora in r.json()["loras"]] == ["acme"]
    statuses = [
        line.split('status="')[1].split('"')[0]
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("http_requests_total{")
    ]
    assert statuses and not [s for s in statuses if s.startswith("5")], statuses
    assert len(BAD_REQUESTS) >= 30


# ---- one bound per field: the configured one, in the message and in the schema ----------------------

BOUNDED = {"width": ("MAX_WIDTH", 256), "height": ("MAX_HEIGHT", 256), "num_inference_steps": ("MAX_STEPS", 10)}


@pytest.mark.parametrize("name", BOUNDED)
@pytest.mark.parametrize("path", ["/generate", "/ab-test"])
def test_a_field_above_its_setting_gets_the_configured_maximum_however_far_above(client: TestClient, name, path):
    setting, maximum = BOUNDED[name]
    extra = {"grid": [{"brand_id": "acme", "weights": [0.5]}]} if path == "/ab-test" else {}
    # Just above, and far above any size a model could serve: one bound, one message.
    for value in (maximum + 8, 100_000):
        r = client.post(path, json={**good(**{name: value}), **extra})
        assert r.status_code == 422, r.text
        [error] = r.json()["detail"]
        assert error["loc"] == ["body", name]
        assert error["msg"] == f"{name} {value} is above the maximum of {maximum} ({setting})"


def test_openai_endpoint_gives_the_same_configured_maxima(client: TestClient):
    for body, param, message in [
        ({"size": "99992x64"}, "size", "width 99992 is above the maximum of 256 (MAX_WIDTH)"),
        ({"size": "64x264"}, "size", "height 264 is above the maximum of 256 (MAX_HEIGHT)"),
        (
            {"num_inference_steps": 10_000},
            "num_inference_steps",
            "num_inference_steps 10000 is above the maximum of 10 ",
        ),
        ({"num_inference_steps": 11}, "num_inference_steps", "num_inference_steps 11 is above the maximum of 10 "),
    ]:
        r = client.post("/v1/images/generations", json={"prompt": "a red coffee cup", "size": "64x64", **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"].startswith(message), r.text


def test_openapi_schema_gives_the_configured_maxima(client: TestClient):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    openai_body = schema["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]
    bodies = {
        "GenerateRequest": components["GenerateRequest"]["properties"],
        "AbTestRequest": components["AbTestRequest"]["properties"],
        "OpenAIImagesRequest": openai_body["schema"]["properties"],
    }
    for body, properties in bodies.items():
        for name, (setting, maximum) in BOUNDED.items():
            if name in properties:
                assert properties[name]["maximum"] == maximum, (body, name, properties[name])
                assert setting in properties[name]["description"]
    assert "num_inference_steps" in bodies["OpenAIImagesRequest"]
    assert "at most 256 (MAX_WIDTH)" in bodies["OpenAIImagesRequest"]["size"]["description"]


# ---- a body that is not a JSON object: say to send application/json ---------------------------------

NOT_JSON = [
    ("JSON without a content type", json.dumps(GOOD).encode(), {}, "no Content-Type header"),
    ("JSON as text/plain", json.dumps(GOOD).encode(), {"content-type": "text/plain"}, "Content-Type is 'text/plain'"),
    ("form-encoded", b"prompt=a", {"content-type": "application/x-www-form-urlencoded"}, "x-www-form-urlencoded"),
    ("malformed JSON", b'{"prompt": "x", ', JSON, "not valid JSON (Expecting property name"),
    ("not JSON at all", b"a red cup", JSON, "not valid JSON"),
    ("a JSON array", b'[{"prompt": "x"}]', JSON, "the body is an array, not an object"),
    ("an empty body", b"", JSON, "the body is empty"),
]


@pytest.mark.parametrize("raw, headers, problem", [case[1:] for case in NOT_JSON], ids=[case[0] for case in NOT_JSON])
@pytest.mark.parametrize("path", ["/generate", "/ab-test"])
def test_a_body_that_is_not_a_json_object_is_told_to_send_application_json(client, path, raw, headers, problem):
    r = client.post(path, content=raw, headers=headers)

    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body"]
    assert "application/json" in error["msg"] and problem in error["msg"], error["msg"]
    assert "dictionary" not in error["msg"] and "JSON decode error" not in error["msg"]


def test_openai_endpoint_also_says_to_send_application_json(client: TestClient):
    for raw in (b"prompt=a", b"[1]"):
        r = client.post("/v1/images/generations", content=raw)
        assert r.status_code == 400 and "application/json" in r.json()["error"]["message"], r.text
