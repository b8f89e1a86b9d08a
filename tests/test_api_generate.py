"""POST /generate and the service endpoints, over the HTTP API of a real app on the embedded model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from app.api.schemas import MAX_SEED
from tests.conftest import (
    decode_png,
    generate,
    pixels,
    png_bytes,
    reference_image,
    sha256_of,
    small_request,
)


@pytest.fixture(scope="module")
def brands(tmp_path_factory, make_brand) -> dict:
    root = tmp_path_factory.mktemp("api-loras")
    return {
        "root": root,
        "acme": make_brand(root, "acme", key_format="peft", seed=11),
        "globex-v1": make_brand(root, "globex", "v1", key_format="kohya", seed=21),
        "globex-v2": make_brand(root, "globex", "v2", key_format="kohya", seed=22, convolutions=True),
    }


@pytest.fixture(scope="module")
def api(make_client, brands):
    with make_client(brands["root"]) as c:
        yield c



# ---- the image ---------------------------------------------------------------------------------


def test_returns_a_png_of_the_requested_size(api):
    body = generate(api, width=64, height=80, seed=3)

    image = decode_png(body["image"])
    assert image.format == "PNG"
    assert image.size == (64, 80)
    assert image.mode == "RGB"
    assert (body["width"], body["height"], body["seed"]) == (64, 80, 3)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(api):
    first = generate(api, seed=5)["image"]
    second = generate(api, seed=5)["image"]
    other = generate(api, seed=6)["image"]

    assert first == second
    assert other != first


def test_seed_is_drawn_and_returned_when_absent_and_reproduces_the_image(api):
    request = small_request()
    del request["seed"]
    drawn = api.post("/generate", json=request).json()

    assert 0 <= drawn["seed"] <= MAX_SEED
    assert generate(api, seed=drawn["seed"])["image"] == drawn["image"]


def test_base_image_equals_diffusers_own_png(api, reference_pipe):
    body = generate(api, seed=9)

    expected = reference_image(reference_pipe, 9, output_type="pil")
    np.testing.assert_array_equal(pixels(png_bytes(body["image"])), np.asarray(expected, dtype=np.int16))


def test_response_reports_timings_and_no_warnings_for_a_plain_request(api):
    body = generate(api)

    assert body["warnings"] == []
    assert body["loras"] == []
    assert set(body["timings"]) == {"queue_ms", "lora_ms", "generation_ms", "total_ms"}
    assert all(value >= 0 for value in body["timings"].values())
    assert body["timings"]["total_ms"] >= body["timings"]["generation_ms"]


def test_returns_the_same_png_as_the_engine_renders(api, expected_png):
    assert png_bytes(generate(api, seed=7)["image"]) == expected_png(None, seed=7)


# ---- brands ------------------------------------------------------------------------------------


def test_brand_changes_the_image_and_is_reported_with_its_file_hash(api, brands, expected_png):
    base = generate(api, seed=7)
    branded = generate(api, seed=7, brand_id="acme", lora_weights=0.8)

    assert png_bytes(branded["image"]) == expected_png(brands["acme"], 0.8, seed=7)
    difference = np.abs(pixels(png_bytes(branded["image"])) - pixels(png_bytes(base["image"])))
    assert difference.mean() > 2, "the brand LoRA should change the image visibly"
    assert branded["loras"] == [
        {
            "brand_id": "acme",
            "version": "default",
            "weight": 0.8,
            "type": None,
            "file": "acme/style.safetensors",
            "sha256": sha256_of(brands["acme"]),
        }
    ]
    assert branded["warnings"] == []


def test_brand_uses_its_latest_version_unless_one_is_asked(api, brands, expected_png):
    latest = generate(api, brand_id="globex")
    v1 = generate(api, brand_id="globex", version="v1")

    assert latest["loras"][0]["version"] == "v2"
    assert latest["loras"][0]["sha256"] == sha256_of(brands["globex-v2"])
    assert v1["loras"][0]["file"] == "globex/v1/style.safetensors"
    assert v1["loras"][0]["sha256"] == sha256_of(brands["globex-v1"])
    assert png_bytes(v1["image"]) == expected_png(brands["globex-v1"], 0.8)
    assert latest["image"] != v1["image"]


def test_weight_zero_gives_the_base_image(api):
    base = generate(api, seed=7)
    zero = generate(api, seed=7, brand_id="acme", lora_weights=0.0)

    assert zero["image"] == base["image"]
    assert zero["loras"][0]["weight"] == 0.0


def test_unknown_brand_gives_the_base_image_with_a_warning(api):
    base = generate(api, seed=7)
    response = api.post("/generate", json=small_request(seed=7, brand_id="no-such-brand"))

    assert response.status_code == 200
    body = response.json()
    assert body["image"] == base["image"]
    assert body["loras"] == []
    assert len(body["warnings"]) == 1 and "no-such-brand" in body["warnings"][0]


def test_lora_configs_compose_brands_with_their_weights_and_types(api, brands):
    body = generate(
        api,
        lora_configs=[{"brand_id": "acme", "weight": 0.5, "type": "style"}, {"brand_id": "globex", "weight": 0.3}],
    )

    assert [(x["brand_id"], x["weight"], x["type"]) for x in body["loras"]] == [
        ("acme", 0.5, "style"),
        ("globex", 0.3, None),
    ]
    assert body["image"] != generate(api, brand_id="acme", lora_weights=0.5)["image"]


# ---- validation --------------------------------------------------------------------------------


def without(field: str) -> dict:
    request = small_request()
    del request[field]
    return request


INVALID = {
    "missing prompt": (without("prompt"), "prompt"),
    "blank prompt": (small_request(prompt="   "), "prompt"),
    "width not a multiple of 8": (small_request(width=100), "width"),
    "height below 64": (small_request(height=32), "height"),
    "weight above 1": (small_request(brand_id="acme", lora_weights=1.5), "lora_weights"),
    "weight below 0": (small_request(brand_id="acme", lora_weights=-0.1), "lora_weights"),
    "width as a string": (small_request(width="512"), "width"),
    "seed as a float": (small_request(seed=1.5), "seed"),
    "seed above 2**32-1": (small_request(seed=2**32), "seed"),
    "unknown field": (small_request(colour="red"), "colour"),
    "brand id with a path": (small_request(brand_id="../etc"), "brand_id"),
    "steps above the configured maximum": (small_request(num_inference_steps=101), "num_inference_steps"),
    "brand listed twice": (
        small_request(brand_id="acme", lora_configs=[{"brand_id": "acme"}]),
        "brand_id",
    ),
}


@pytest.mark.parametrize("request_body, field", INVALID.values(), ids=INVALID.keys())
def test_invalid_request_is_422_naming_the_field(api, request_body, field):
    response = api.post("/generate", json=request_body)

    assert response.status_code == 422
    locations = [error["loc"] for error in response.json()["detail"]]
    assert ["body", field] in locations, locations


def test_body_that_is_not_json_is_422(api):
    response = api.post("/generate", content=b"prompt=cup", headers={"content-type": "application/json"})

    assert response.status_code == 422


# ---- service endpoints ---------------------------------------------------------------------------


def test_service_info(api, brands):
    info = api.get("/").json()

    assert info["ready"] is True
    assert info["model"] == "tiny" and info["embedded_model"] is True
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["loras_found"] == 2
    assert info["lora_dir"] == str(brands["root"].resolve())
    assert info["cache"] == {"enabled": True, "max_size": 5, "preload_brands": []}


def test_health_and_ready_after_loading(api):
    assert api.get("/health").json() == {"status": "ok"}
    ready = api.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "preload": {}}


def test_ready_is_503_while_the_model_loads_and_generate_waits_for_it(model_cache_dir, lora_root):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import test_settings

    app = create_app(test_settings(model_cache_dir, lora_root))
    state = app.state.service_state
    release = threading.Event()
    real_load = state.load

    def slow_load():
        release.wait(60)
        real_load()

    state.load = slow_load
    with TestClient(app) as c:
        assert c.get("/health").json() == {"status": "ok"}
        loading = c.get("/ready")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        assert c.post("/generate", json=small_request()).status_code == 503
        assert c.get("/lora/cache/stats").status_code == 503

        release.set()
        assert state.wait_ready(120)
        assert c.get("/ready").status_code == 200
        assert c.post("/generate", json=small_request()).status_code == 200


def test_ready_reports_a_model_that_failed_to_load(model_cache_dir, lora_root, tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import test_settings

    empty_model = tmp_path / "not-a-model"
    empty_model.mkdir()
    app = create_app(test_settings(model_cache_dir, lora_root, model_id=str(empty_model)))
    with TestClient(app) as c:
        state = app.state.service_state
        for _ in range(600):
            if state.load_error:
                break
            threading.Event().wait(0.1)

        ready = c.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "failed" and ready.json()["error"]
        generate = c.post("/generate", json=small_request())
        assert generate.status_code == 503
        assert "failed to load" in generate.json()["detail"]


def test_png_decodes_with_pillow_verify(api):
    import base64
    import io

    raw = base64.b64decode(generate(api)["image"])
    Image.open(io.BytesIO(raw)).verify()  # raises on a corrupt PNG
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("page", "asset"), [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")])
def test_docs_pages_load_their_assets_from_the_service_not_a_cdn(client, page, asset):
    import re

    html = client.get(page)
    assert html.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', html.text)
    assert any(s.endswith(asset) for s in sources), sources
    assert all(s.startswith("/") for s in sources), f"{page} loads something from another host: {sources}"
    for source in sources:
        assert client.get(source).status_code == 200, source
