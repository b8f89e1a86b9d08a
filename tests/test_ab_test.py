"""A/B tests of LoRA weights: grids and explicit variants, identity with /generate, the contact sheet,
the cap, choices that survive a restart, a brand's results, and fair interleaving in the queue.

Everything runs on the embedded model at 64x64 with 2 steps; one app serves the module.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.ab.contact_sheet import GUTTER, render_contact_sheet
from app.ab.plan import GridAxis, plan_grid
from app.ab.runner import run_ab_test
from app.ab.store import STORE_FILE
from app.config import Settings
from app.demo import write_demo_loras
from app.jobs import ActiveAdapter, AppliedLora, GenerationSpec, JobResult
from app.lora.manager import AcquiredLoras, Resolution
from app.main import create_app
from app.queueing import GenerationQueue
from app.service import GenerationService

SIZE = 64
STEPS = 2
SETTINGS = {"prompt": "a red coffee cup on a wooden table", "width": SIZE, "height": SIZE, "num_inference_steps": STEPS}
GRID_2X2 = [{"brand_id": "acme", "weights": [0.2, 0.8]}, {"brand_id": "globex", "weights": [0.0, 0.5]}]


def ab_settings(lora_dir: Path, data_dir: Path, **overrides) -> Settings:
    return Settings(
        model_cache_dir=Settings.model_fields["model_cache_dir"].default,  # the embedded model, built once
        lora_base_dir=lora_dir,
        data_dir=data_dir,
        device="cpu",
        dtype="float32",
        log_level="warning",
        lora_preload_brands="",
        **overrides,
    )


def pixels(image_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> SimpleNamespace:
    lora_dir = tmp_path_factory.mktemp("ab-loras")
    write_demo_loras(lora_dir)  # acme, globex (v1, v2), studio-light
    return SimpleNamespace(loras=lora_dir, data=tmp_path_factory.mktemp("ab-data"))


@pytest.fixture(scope="module")
def client(dirs) -> TestClient:
    app = create_app(ab_settings(dirs.loras, dirs.data))
    with TestClient(app) as c:
        state = app.state.service_state
        assert state.wait_ready(120), state.load_error
        yield c


@pytest.fixture(scope="module")
def grid_test(client) -> dict:
    """One 2x2 grid test shared by the tests that only read it (the first test of the fresh app)."""
    before = client.get("/lora/cache/stats").json()
    response = client.post("/ab-test", json={**SETTINGS, "seed": 7, "grid": GRID_2X2})
    assert response.status_code == 200, response.text
    return {**response.json(), "stats": (before, client.get("/lora/cache/stats").json())}


# ---- running tests -------------------------------------------------------------------------------


def test_grid_makes_the_cartesian_product_with_one_seed(grid_test):
    t = grid_test
    assert (t["rows"], t["cols"], t["seeds"]) == (2, 2, [7])
    weights = [[(lora["brand_id"], lora["weight"]) for lora in v["loras"]] for v in t["variants"]]
    assert weights == [  # row-major: rows are acme's weights, columns globex's
        [("acme", 0.2), ("globex", 0.0)],
        [("acme", 0.2), ("globex", 0.5)],
        [("acme", 0.8), ("globex", 0.0)],
        [("acme", 0.8), ("globex", 0.5)],
    ]
    assert [v["index"] for v in t["variants"]] == [0, 1, 2, 3]
    assert [v["label"] for v in t["variants"]][1] == "acme 0.2, globex 0.5"
    assert {v["seed"] for v in t["variants"]} == {7}
    assert all(v["loras"][1]["version"] == "v2" for v in t["variants"])  # latest version by default
    assert t["warnings"] == [] and all(v["warnings"] == [] for v in t["variants"])
    images = [v["image"] for v in t["variants"]]
    assert len(set(images)) == 4, "every weight combination must change the image"
    assert all(pixels(image).shape == (SIZE, SIZE, 3) for image in images)
    assert all(v["timings"]["generation_ms"] > 0 for v in t["variants"])


def test_each_variant_is_identical_to_generate(client, grid_test):
    for variant in grid_test["variants"][0::3]:  # globex at 0.0 (left out of the merge) and both at their highest
        body = {**SETTINGS, "seed": variant["seed"], "lora_configs": variant["lora_configs"]}
        generated = client.post("/generate", json=body).json()
        assert base64.b64decode(generated["image"]) == base64.b64decode(variant["image"]), variant["label"]
        assert generated["loras"] == variant["loras"]


def test_contact_sheet_shows_every_cell_with_a_label(grid_test):
    sheet = Image.open(io.BytesIO(base64.b64decode(grid_test["contact_sheet"]))).convert("RGB")
    cells = [[Image.open(io.BytesIO(base64.b64decode(v["image"])))] for v in grid_test["variants"]]
    labels = [v["label"].split(", ") for v in grid_test["variants"]]
    _, layout = render_contact_sheet(cells, labels, 2, 2)
    assert layout.cell_width >= SIZE and layout.label_height > 10
    assert sheet.size == layout.size == (
        2 * layout.cell_width + 3 * GUTTER,
        2 * (SIZE + layout.label_height) + 3 * GUTTER,
    )
    crops = []
    for variant, (x, y) in zip(grid_test["variants"], layout.image_origins, strict=True):
        crop = np.asarray(sheet.crop((x, y, x + SIZE, y + SIZE)), dtype=np.int16)
        assert np.array_equal(crop, pixels(variant["image"])), f"cell {variant['index']} is not its image"
        label = np.asarray(sheet.crop((x, y + SIZE, x + layout.cell_width, y + SIZE + layout.label_height)))
        assert label.min() < 100, f"cell {variant['index']} has no label"
        crops.append(crop)
    assert all(not np.array_equal(a, b) for i, a in enumerate(crops) for b in crops[i + 1 :])


def test_explicit_variants_with_several_seeds(client):
    body = {**SETTINGS, "seeds": [3, 4], "variants": [
        {"lora_configs": [{"brand_id": "nope", "weight": 0.5}]},
        {"lora_configs": [{"brand_id": "acme", "weight": 0.5, "type": "style"}]},
    ]}
    response = client.post("/ab-test", json=body)
    assert response.status_code == 200, response.text
    t = response.json()
    assert (t["rows"], t["cols"], t["seeds"]) == (1, 2, [3, 4])
    missing, acme = t["variants"]
    assert [v["seed"] for v in t["variants"]] == [3, 3]
    assert [[i["seed"] for i in v["extra_images"]] for v in t["variants"]] == [[4], [4]]
    assert acme["loras"][0]["type"] == "style" and missing["loras"] == []
    assert "nope" in missing["warnings"][0] and "nope" in t["warnings"][0] and acme["warnings"] == []
    assert acme["image"] != missing["image"] and missing["image"] != missing["extra_images"][0]["image"]
    # A LoRA that is not found falls back to the base model, exactly as /generate does.
    generated = client.post("/generate", json={**SETTINGS, "seed": 4}).json()
    assert base64.b64decode(generated["image"]) == base64.b64decode(missing["extra_images"][0]["image"])
    sheet = Image.open(io.BytesIO(base64.b64decode(t["contact_sheet"])))
    assert sheet.width >= 2 * 2 * SIZE + 3 * GUTTER  # a row of cells, two seeds per cell


def test_adapters_are_acquired_once_for_the_whole_test(grid_test):
    before, after = grid_test["stats"]
    # Four variants, two LoRAs: one cache lookup per LoRA for the whole test, not one per variant.
    lookups = lambda stats: stats["hits"] + stats["misses"]  # noqa: E731
    assert lookups(after) - lookups(before) == 2
    assert {"acme", "globex@v2"} <= set(after["cached"])


# ---- refused requests ----------------------------------------------------------------------------


def test_grid_beyond_the_cap_is_refused_with_the_count(client):
    grid = [{"brand_id": "acme", "weights": [0.1, 0.2, 0.3, 0.4, 0.5]},
            {"brand_id": "globex", "weights": [0.0, 0.25, 0.5, 0.75]}]
    response = client.post("/ab-test", json={**SETTINGS, "grid": grid})
    assert response.status_code == 422
    message = response.json()["detail"][0]["msg"]
    assert "20 variants" in message and "16" in message and "AB_MAX_VARIANTS" in message


def test_variants_and_seeds_beyond_the_cap_are_refused(client):
    many = {**SETTINGS, "variants": [{"lora_configs": [{"brand_id": "acme", "weight": i / 20}]} for i in range(17)]}
    response = client.post("/ab-test", json=many)
    assert response.status_code == 422 and "17 variants" in response.json()["detail"][0]["msg"]
    seeds = {**SETTINGS, "seeds": [1, 2, 3, 4, 5], "grid": GRID_2X2}
    response = client.post("/ab-test", json=seeds)
    assert response.status_code == 422 and "20 images" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    "extra",
    [
        {},  # neither variants nor grid
        {"grid": GRID_2X2, "variants": [{"lora_configs": []}]},  # both
        {"grid": GRID_2X2, "seed": 1, "seeds": [1]},
        {"grid": [{"brand_id": "acme", "weights": [0.2]}, {"brand_id": "acme", "weights": [0.5]}]},
        {"grid": [{"brand_id": "acme", "weights": [0.2, 0.2]}]},
        {"grid": [{"brand_id": "acme", "weights": []}]},
        {"grid": [{"brand_id": "acme", "weights": [1.5]}]},
        {"grid": [{"brand_id": "../etc", "weights": [0.5]}]},
        {"variants": [{"lora_configs": [{"brand_id": "acme"}, {"brand_id": "acme"}]}]},
        {"grid": GRID_2X2, "colour": "red"},
    ],
)
def test_malformed_requests_are_422(client, extra):
    assert client.post("/ab-test", json={**SETTINGS, **extra}).status_code == 422


# ---- choices and results -------------------------------------------------------------------------


def test_choice_errors(client, grid_test):
    test_id = grid_test["test_id"]
    assert client.post("/ab-test/0123456789abcdef/choice", json={"variant": 0}).status_code == 404
    out_of_range = client.post(f"/ab-test/{test_id}/choice", json={"variant": 4})
    assert out_of_range.status_code == 422 and "0..3" in out_of_range.json()["detail"][0]["msg"]
    assert client.post(f"/ab-test/{test_id}/choice", json={"variant": -1}).status_code == 422
    assert client.post(f"/ab-test/{test_id}/choice", json={"variant": "1"}).status_code == 422
    assert client.get("/ab-test/0123456789abcdef").status_code == 404
    assert client.get("/lora/no-such-brand/ab-results").status_code == 404


def test_choices_survive_a_restart_and_drive_the_recommendation(client, dirs):
    grid = [{"brand_id": "acme", "weights": [0.2, 0.8]}, {"brand_id": "globex", "weights": [0.0]}]
    first = client.post("/ab-test", json={**SETTINGS, "seed": 11, "grid": grid}).json()
    second = client.post("/ab-test", json={**SETTINGS, "seed": 12, "grid": grid}).json()
    recorded = client.post(
        f"/ab-test/{first['test_id']}/choice", json={"variant": 1, "chosen_by": "ana", "reason": "cleaner"}
    )
    assert recorded.status_code == 201 and recorded.json()["variant"] == 1
    assert client.post(f"/ab-test/{second['test_id']}/choice", json={"variant": 1}).status_code == 201
    state = client.app.state.service_state
    state.ab_store.close()
    state.ab_store = None  # this module's app reopens it on next use

    with TestClient(create_app(ab_settings(dirs.loras, dirs.data))) as restarted:
        # The store needs no model: these answer while the model is still loading.
        acme = restarted.get("/lora/acme/ab-results").json()
        globex = restarted.get("/lora/globex/ab-results").json()
        stored = restarted.get(f"/ab-test/{first['test_id']}").json()
        assert restarted.post(f"/ab-test/{first['test_id']}/choice", json={"variant": 0}).status_code == 201
        latest = restarted.get("/lora/acme/ab-results").json()["recommended_weight"]
        acme_metadata = restarted.get("/lora/acme/metadata").json()
        restarted.app.state.service_state.ab_store.close()
        restarted.app.state.service_state.wait_ready(120)

    assert stored["choices"][0] == {**stored["choices"][0], "variant": 1, "chosen_by": "ana", "reason": "cleaner"}
    assert stored["prompt"] == SETTINGS["prompt"] and stored["settings"]["seeds"] == [11]
    assert stored["variants"][0]["lora_configs"][0] == {"brand_id": "acme", "weight": 0.2, "version": None,
                                                        "type": None}
    assert "image" not in str(stored)
    # The most recent choice was variant 1 of the second test: acme 0.8, globex 0.0.
    assert acme["recommended_weight"] == 0.8 and globex["recommended_weight"] == 0.0
    ids = [t["test_id"] for t in acme["data"]]
    assert ids.index(second["test_id"]) < ids.index(first["test_id"])  # newest first
    assert acme["count"] == len(acme["data"]) >= 2
    assert latest == 0.2  # then variant 0 of the first test: acme 0.2
    assert acme_metadata["recommended_weight"] == 0.2  # and the LoRA's metadata shows it
    with sqlite3.connect(dirs.data / STORE_FILE) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM choices").fetchone()[0] >= 3


def test_brand_without_choices_has_no_recommendation(client):
    assert client.get("/lora/studio-light/metadata").json()["recommended_weight"] is None
    results = client.get("/lora/studio-light/ab-results")
    assert results.status_code == 200
    assert results.json()["recommended_weight"] is None


def test_ui_page_is_served(client):
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/ab-test" in page.text and "/lora/list" in page.text and "<script" in page.text


def test_the_page_starts_from_small_sizes_on_the_embedded_model(client):
    defaults = client.get("/ui/defaults")

    assert defaults.status_code == 200
    # The embedded model's images mean nothing at any size: the smallest quick ones, not SD 1.5's 512 x 20 steps.
    assert defaults.json() == {
        "width": 64, "height": 64, "num_inference_steps": 10,
        "maxima": {"width": 1024, "height": 1024, "num_inference_steps": 100},
    }  # fmt: skip
    page = client.get("/ui").text
    assert "/ui/defaults" in page


def test_the_page_starts_from_a_real_models_native_size_within_the_limits(model_dir, tmp_path):
    settings = ab_settings(
        tmp_path / "loras", tmp_path / "data", model_id=str(model_dir),  # a model folder: not "the embedded model"
        max_width=384, max_steps=12, max_pixels=384 * 256, api_key="user-key",
    )  # fmt: skip
    app = create_app(settings)
    with TestClient(app) as c:
        state = app.state.service_state
        assert state.wait_ready(120), state.load_error
        assert state.engine.native_size == 512  # SD 1.5's layout: 64 latents x 8
        defaults = c.get("/ui/defaults")  # no key: the page loads it before anyone types one

    assert defaults.status_code == 200, defaults.text
    d = defaults.json()
    assert d["maxima"] == {"width": 384, "height": 512 * 2, "num_inference_steps": 12}
    assert d["num_inference_steps"] == 12 and d["width"] <= 384 and d["width"] * d["height"] <= 384 * 256
    assert d["width"] % 8 == 0 and d["height"] % 8 == 0 and min(d["width"], d["height"]) >= 64


# ---- the queue: other requests interleave between variants ---------------------------------------


def test_variants_are_separate_jobs_that_let_other_requests_in():
    """Scripted with a fake engine: a request queued while variant 0 runs goes before variant 1."""
    order: list[str] = []
    first_running, release = threading.Event(), threading.Event()

    def execute(jobs, on_step):
        (job,) = jobs  # BATCH_MAX_SIZE 1 here: each image its own loop
        order.append(f"ab {job.adapters[0].weight:g}" if job.adapters else job.spec.prompt)
        if len(order) == 1:
            first_running.set()
            assert release.wait(5)
        return [JobResult(Image.new("RGB", (8, 8)), 0.0, 0.0)]

    acquire_calls = []

    def acquire(specs, strict):
        acquire_calls.append(list(specs))
        adapter = ActiveAdapter("acme", object(), 0.8)
        applied = AppliedLora("acme", "default", 0.8, None, "acme/style.safetensors", "0" * 64)
        return AcquiredLoras(specs=list(specs), resolved={("acme", None): Resolution(adapter, applied)})

    queue = GenerationQueue(execute, max_waiting=4, timeout_s=10)
    service = GenerationService(Settings(), SimpleNamespace(acquire=acquire), queue)
    plan = plan_grid([GridAxis("acme", (0.2, 0.5, 0.8))], seeds=[1], max_variants=16)
    spec = GenerationSpec("p", None, 64, 64, 2, 7.5, 1)

    async def scenario():
        test = asyncio.create_task(run_ab_test(service, plan, spec))
        await asyncio.to_thread(first_running.wait, 5)
        other = asyncio.create_task(service.generate(dataclasses.replace(spec, prompt="other user"), []))
        await asyncio.sleep(0.1)  # the other request is in the queue now
        release.set()
        outcome, _ = await asyncio.gather(test, other)
        return outcome

    try:
        outcome = asyncio.run(scenario())
    finally:
        queue.shutdown()
    assert order == ["ab 0.2", "other user", "ab 0.5", "ab 0.8"]
    assert len(acquire_calls) == 2 and [s.brand_id for s in acquire_calls[0]] == ["acme"]
    assert [v.applied[0].weight for v in outcome.variants] == [0.2, 0.5, 0.8]
    assert queue.depth == 0
