"""Brand-scoped keys (API_KEYS_FILE) against a real uvicorn: every refusal, with brands that exist and
brands that do not, reads that leak nothing, quotas, reloads, audit lines and a log free of keys.

One server serves the module (its keys file is rewritten by the reload tests, which run last).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.access import key_digest
from app.api.security import ROUTE_ROLES
from app.keys import toml_block
from tests.conftest import PROJECT_ROOT, ServerProcess, small_request

KEYS = {
    "acme-gen": "bis_gen_0123456789abcdefghijklmnopqrstuv",
    "acme-pub": "bis_pub_0123456789abcdefghijklmnopqrstuv",
    "root": "bis_adm_0123456789abcdefghijklmnopqrstuv",
    "slow": "bis_slo_0123456789abcdefghijklmnopqrstuv",
    "newcomer": "bis_new_0123456789abcdefghijklmnopqrstuv",
}
ENTRIES = {
    "acme-gen": (["acme", "acme-*"], ["generate"], 0),
    "acme-pub": (["acme*"], ["publish"], 0),
    "root": (["*"], ["admin"], 0),
    "slow": (["acme"], ["generate"], 3),
}
FORBIDDEN = ["globex", "initech"]  # globex exists on disk, initech does not: the answers must be the same
RELOAD_DEADLINE_S = 5.0  # the bound for a new key to work and a removed one to be refused


def keys_toml(entries: dict) -> str:
    return "\n".join(toml_block(name, key_digest(KEYS[name]), *entries[name]) for name in entries)


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_brand, make_lora):
    work = tmp_path_factory.mktemp("keys")
    make_brand(work / "loras", "acme", "v1", seed=1)
    make_brand(work / "loras", "globex", "v1", seed=2)
    keys_file = work / "keys.toml"
    keys_file.write_text(keys_toml(ENTRIES))
    server = ServerProcess(work, {"API_KEYS_FILE": str(keys_file), "LOG_LEVEL": "info"})
    server.keys_file = keys_file
    server.lora_file = make_lora(work / "upload" / "new.safetensors", seed=3)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        server.client = client
        yield server
    server.stop()


def post(server, path: str, key: str | None, **kwargs) -> httpx.Response:
    return server.client.post(path, headers=auth(key) if key else {}, **kwargs)


def get(server, path: str, key: str | None, **kwargs) -> httpx.Response:
    return server.client.get(path, headers=auth(key) if key else {}, **kwargs)


def key_series(server, name: str, key: str) -> float:
    """api_key_<name>_total{key=...} from /metrics (0 when the series is not there yet)."""
    text = get(server, "/metrics", "root").text
    match = re.search(rf'^api_key_{name}_total{{key="{re.escape(key)}"}} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def same_answer(responses: dict[str, httpx.Response]) -> None:
    """The answers for each forbidden brand are the same once the brand's name is taken out."""
    bodies = {brand: (r.status_code, r.text.replace(brand, "<brand>")) for brand, r in responses.items()}
    assert len(set(bodies.values())) == 1, bodies


# ---- images: a brand outside the key's patterns is refused wherever it is named -----------------


IMAGE_REQUESTS = {
    "generate brand_id": ("/generate", lambda b: small_request(brand_id=b)),
    "generate lora_configs": ("/generate", lambda b: small_request(lora_configs=[{"brand_id": b, "weight": 0.5}])),
    "generate <lora:> tag": ("/generate", lambda b: small_request(prompt=f"a cup <lora:{b}:0.5>")),
    "generate strict": ("/generate", lambda b: small_request(brand_id=b, strict=True)),
    "generate beside an allowed brand": (
        "/generate", lambda b: small_request(brand_id="acme", lora_configs=[{"brand_id": b, "weight": 0.5}]),
    ),
    "openai brand_id": ("/v1/images/generations", lambda b: {"prompt": "a cup", "size": "64x64", "brand_id": b,
                                                              "num_inference_steps": 2}),
    "openai lora_configs": ("/v1/images/generations", lambda b: {"prompt": "a cup", "size": "64x64", "n": 2,
                                                                  "lora_configs": [{"brand_id": b}],
                                                                  "num_inference_steps": 2}),
    "openai tag": ("/v1/images/generations", lambda b: {"prompt": f"a cup <lora:{b}:0.7>", "size": "64x64",
                                                         "num_inference_steps": 2}),
    "ab-test variants": ("/ab-test", lambda b: {**small_request(), "variants": [
        {"lora_configs": [{"brand_id": "acme", "weight": 0.5}]}, {"lora_configs": [{"brand_id": b, "weight": 0.5}]}]}),
    "ab-test grid": ("/ab-test", lambda b: {**small_request(), "grid": [{"brand_id": b, "weights": [0, 0.5]}]}),
    "img2img brand_id": ("/generate", lambda b: small_request(brand_id=b, init_image=small_png())),
    "job brand_id": ("/jobs", lambda b: small_request(brand_id=b)),
    "job tag": ("/jobs", lambda b: small_request(prompt=f"a cup <lora:{b}:0.5>")),
    "sdapi txt2img tag": ("/sdapi/v1/txt2img", lambda b: {"prompt": f"a cup <lora:{b}:0.5>", "steps": 2,
                                                           "width": 64, "height": 64}),
    "sdapi img2img tag": ("/sdapi/v1/img2img", lambda b: {"prompt": f"a cup <lora:{b}:0.5>", "steps": 2,
                                                           "width": 64, "height": 64, "init_images": [small_png()]}),
    "ab-test prompt tag": ("/ab-test", lambda b: {**small_request(prompt=f"a cup <lora:{b}:0.3>"), "variants": [
        {"lora_configs": [{"brand_id": "acme", "weight": 0.5}]}, {"lora_configs": []}]}),
}  # fmt: skip


@pytest.mark.parametrize("case", IMAGE_REQUESTS, ids=list(IMAGE_REQUESTS))
def test_an_image_with_another_brand_is_403_naming_it_and_nothing_is_generated(server, case):
    path, body = IMAGE_REQUESTS[case]
    images_before = key_series(server, "images", "acme-gen")
    answers = {brand: post(server, path, "acme-gen", json=body(brand)) for brand in FORBIDDEN}
    for brand, r in answers.items():
        assert r.status_code == 403, r.text
        assert f"brand '{brand}' is not among the brands of key 'acme-gen'" in r.text
        if path.startswith("/v1/"):
            assert r.json()["error"]["type"] == "permission_error"
    same_answer(answers)
    assert key_series(server, "images", "acme-gen") == images_before


def test_own_brands_and_the_base_model_generate(server):
    for body in (small_request(), small_request(brand_id="acme"), small_request(prompt="a cup <lora:acme:0.4>")):
        r = post(server, "/generate", "acme-gen", json=body)
        assert r.status_code == 200, r.text
    r = post(
        server,
        "/v1/images/generations",
        "acme-gen",
        json={"prompt": "a cup", "size": "64x64", "num_inference_steps": 2, "brand_id": "acme"},
    )
    assert r.status_code == 200, r.text
    ab = post(
        server, "/ab-test", "acme-gen", json={**small_request(), "grid": [{"brand_id": "acme", "weights": [0, 0.5]}]}
    )
    assert ab.status_code == 200, ab.text
    assert key_series(server, "images", "acme-gen") >= 6  # 3 + 1 + the A/B test's 2


def small_png(mode: str = "RGB", colour=(200, 40, 40)) -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (64, 64), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_an_openai_edit_with_another_brand_is_403_naming_it(server):
    answers = {}
    for brand in FORBIDDEN:
        files = {"image": ("i.png", base64.b64decode(small_png("RGBA", (200, 40, 40, 0))))}
        data = {"prompt": f"a cup <lora:{brand}:0.5>", "size": "64x64", "num_inference_steps": "2"}
        answers[brand] = server.client.post("/v1/images/edits", files=files, data=data, headers=auth("acme-gen"))
    for brand, r in answers.items():
        assert r.status_code == 403, r.text
        assert r.json()["error"]["type"] == "permission_error" and f"brand '{brand}'" in r.text
    same_answer(answers)


def test_a_keys_jobs_are_its_own_and_a_refused_job_is_not_stored(server):
    before = get(server, "/jobs", "root").json()["count"]
    assert post(server, "/jobs", "acme-gen", json=small_request(brand_id="globex")).status_code == 403
    assert get(server, "/jobs", "root").json()["count"] == before  # nothing was stored
    accepted = post(server, "/jobs", "acme-gen", json=small_request(brand_id="acme"))
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()
    assert job["owner"] == "acme-gen"
    # Another key: the job is as unknown as a job that does not exist (the id aside).
    for method, path in [("GET", "/jobs/{}"), ("GET", "/jobs/{}/image"), ("GET", "/jobs/{}/events"),
                         ("DELETE", "/jobs/{}")]:  # fmt: skip
        theirs = server.client.request(method, path.format(job["id"]), headers=auth("acme-pub"))
        missing = server.client.request(method, path.format("0" * 32), headers=auth("acme-pub"))
        assert theirs.status_code == missing.status_code == 404, (path, theirs.text)
        assert theirs.text.replace(job["id"], "<id>") == missing.text.replace("0" * 32, "<id>")
    assert job["id"] not in [j["id"] for j in get(server, "/jobs", "acme-pub").json()["data"]]
    assert job["id"] in [j["id"] for j in get(server, "/jobs", "acme-gen").json()["data"]]
    assert job["id"] in [j["id"] for j in get(server, "/jobs", "root").json()["data"]]
    assert get(server, f"/jobs/{job['id']}", "root").status_code == 200


def test_automatic1111_lists_only_the_keys_brands(server):
    basic = {"Authorization": "Basic " + base64.b64encode(f"webui:{KEYS['acme-gen']}".encode()).decode()}
    mine = server.client.get("/sdapi/v1/loras", headers=basic)
    assert mine.status_code == 200 and [lora["name"] for lora in mine.json()] == ["acme"]
    assert [lora["name"] for lora in get(server, "/sdapi/v1/loras", "root").json()] == ["acme", "globex"]


# ---- uploads, deletes, training -------------------------------------------------------------------


def upload(server, brand: str, key: str) -> httpx.Response:
    files = {"file": ("new.safetensors", server.lora_file.read_bytes())}
    return server.client.post(f"/lora/{brand}/versions", files=files, headers=auth(key))


def test_uploads_deletes_and_training_of_another_brand_are_403_naming_it(server):
    answers = {b: upload(server, b, "acme-pub") for b in FORBIDDEN}
    for brand, r in answers.items():
        assert r.status_code == 403 and f"brand '{brand}'" in r.text, r.text
    same_answer(answers)
    answers = {b: server.client.delete(f"/lora/{b}/versions/v1", headers=auth("acme-pub")) for b in FORBIDDEN}
    for brand, r in answers.items():
        assert r.status_code == 403 and f"brand '{brand}'" in r.text, r.text
    same_answer(answers)
    answers = {b: server.client.post(f"/lora/{b}/train", files={"dataset": ("d.zip", b"PK")},
                                     headers=auth("acme-pub")) for b in FORBIDDEN}  # fmt: skip
    for brand, r in answers.items():
        assert r.status_code == 403 and f"brand '{brand}'" in r.text, r.text
    same_answer(answers)
    assert not (server.work_dir / "loras" / "initech").exists()
    assert sorted(p.name for p in (server.work_dir / "loras" / "globex").iterdir()) == ["v1"]


def test_generate_keys_may_not_publish_and_publish_keys_audit_what_they_do(server):
    refused = upload(server, "acme", "acme-gen")
    assert refused.status_code == 403 and "needs the 'publish' role" in refused.text
    assert server.client.delete("/lora/acme/versions/v1", headers=auth("acme-gen")).status_code == 403
    r = upload(server, "acme", "acme-pub")
    assert r.status_code == 201, r.text
    version, sha256 = r.json()["version"], r.json()["sha256"]
    assert server.client.delete(f"/lora/acme/versions/{version}", headers=auth("acme-pub")).status_code == 204
    log = wait_for_log(server, f"action=delete key=acme-pub brand=acme version={version} sha256={sha256}")
    assert f"action=upload key=acme-pub brand=acme version={version} sha256={sha256}" in log


def wait_for_log(server, text: str, deadline_s: float = RELOAD_DEADLINE_S) -> str:
    deadline = time.monotonic() + deadline_s
    while text not in (log := server.log()):
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{log[-3000:]}"
        time.sleep(0.05)
    return log


# ---- reads leak nothing ---------------------------------------------------------------------------


def test_the_list_shows_only_the_keys_brands(server):
    mine = get(server, "/lora/list", "acme-gen").json()
    assert [e["brand_id"] for e in mine["data"]] == ["acme"] and mine["count"] == 1
    everyone = get(server, "/lora/list", "root").json()
    assert [e["brand_id"] for e in everyone["data"]] == ["acme", "globex"] and everyone["count"] == 2
    assert get(server, "/", "acme-gen").json()["loras_found"] == 1
    assert get(server, "/", "root").json()["loras_found"] == 2


def test_another_brands_metadata_and_ab_results_are_the_404_of_a_missing_brand(server):
    for path in ("/lora/{}/metadata", "/lora/{}/ab-results"):
        answers = {b: get(server, path.format(b), "acme-gen") for b in FORBIDDEN}
        assert all(r.status_code == 404 for r in answers.values()), answers
        same_answer(answers)
        assert get(server, path.format("globex"), "root").status_code in (200, 404)
    assert get(server, "/lora/acme/metadata", "acme-gen").status_code == 200
    assert get(server, "/lora/globex/metadata", "root").status_code == 200


def test_ab_tests_of_another_brand_are_404(server):
    body = {**small_request(), "grid": [{"brand_id": "globex", "weights": [0, 0.5]}]}
    test_id = post(server, "/ab-test", "root", json=body).json()["test_id"]
    theirs = get(server, f"/ab-test/{test_id}", "acme-gen")
    missing = get(server, "/ab-test/0123456789abcdef0123456789abcdef", "acme-gen")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.text.replace(test_id, "<id>") == missing.text.replace("0123456789abcdef0123456789abcdef", "<id>")
    assert post(server, f"/ab-test/{test_id}/choice", "acme-gen", json={"variant": 1}).status_code == 404
    assert get(server, f"/ab-test/{test_id}", "root").status_code == 200
    results = get(server, "/lora/globex/ab-results", "root").json()
    assert test_id in [t["test_id"] for t in results["data"]]


def test_cache_stats_show_a_key_only_its_brands_and_clear_and_metrics_need_admin(server):
    assert post(server, "/generate", "root", json=small_request(brand_id="globex")).status_code == 200
    assert post(server, "/generate", "acme-gen", json=small_request(brand_id="acme")).status_code == 200
    mine = get(server, "/lora/cache/stats", "acme-gen").json()
    assert mine["cached"] and all(k.startswith("acme") for k in mine["cached"] + mine["pinned"]), mine
    everyone = get(server, "/lora/cache/stats", "root").json()
    assert any(k.startswith("globex") for k in everyone["cached"]) and mine["hits"] == everyone["hits"]
    for key in ("acme-gen", "acme-pub"):
        r = post(server, "/lora/cache/clear", key)
        assert r.status_code == 403 and "needs the 'admin' role" in r.text
        assert get(server, "/metrics", key).status_code == 403
    assert post(server, "/lora/cache/clear", "root").status_code == 200
    wait_for_log(server, "action=cache-clear key=root brand=- version=- sha256=-")
    metrics = get(server, "/metrics", "root")
    assert metrics.status_code == 200 and 'api_key_requests_total{key="acme-gen"}' in metrics.text


def test_no_key_or_a_wrong_one_is_401(server):
    for headers in ({}, {"Authorization": "Bearer bis_nope"}, {"Authorization": f"Bearer {KEYS['acme-gen']}x"}):
        r = server.client.post("/generate", json=small_request(), headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    assert server.client.get("/health").status_code == 200


def test_basic_auth_with_the_key_as_password_works_on_sdapi_only(server):
    basic = {"Authorization": "Basic " + base64.b64encode(f"anyone:{KEYS['acme-gen']}".encode()).decode()}
    assert server.client.get("/sdapi/v1/nothing-here", headers=basic).status_code == 404  # past auth
    wrong = {"Authorization": "Basic " + base64.b64encode(b"anyone:bis_nope").decode()}
    assert server.client.get("/sdapi/v1/nothing-here", headers=wrong).status_code == 401
    assert server.client.post("/generate", json=small_request(), headers=basic).status_code == 401


# ---- quotas ---------------------------------------------------------------------------------------


def test_a_key_over_its_rate_gets_429_with_retry_after_and_starts_no_image(server):
    # 3 per minute: an A/B test of 6 images is over the bucket at once, and is refused before any image.
    grid = {**small_request(), "grid": [{"brand_id": "acme", "weights": [0, 0.1, 0.2, 0.3, 0.4, 0.5]}]}
    r = post(server, "/ab-test", "slow", json=grid)
    assert r.status_code == 429, r.text
    assert 1 <= int(r.headers["retry-after"]) <= 60
    # 4 OpenAI images, made one by one, are paid for before the first starts: all refused at once.
    openai = {"prompt": "a cup", "size": "64x64", "num_inference_steps": 2, "n": 4}
    r = post(server, "/v1/images/generations", "slow", json=openai)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error", r.text
    assert 1 <= int(r.headers["retry-after"]) <= 60
    answers = [get(server, "/lora/list", "slow") for _ in range(5)]
    statuses = [a.status_code for a in answers]
    assert 429 in statuses and set(statuses) <= {200, 429}, statuses
    limited = answers[statuses.index(429)]
    assert 1 <= int(limited.headers["retry-after"]) <= 60 and "3 requests per minute" in limited.text
    image = post(server, "/generate", "slow", json=small_request(brand_id="acme"))
    assert image.status_code == 429 and "retry-after" in image.headers
    assert key_series(server, "images", "slow") == 0
    assert key_series(server, "requests_limited", "slow") >= 3
    assert 'api_key_requests_limited_total{key="slow"}' in get(server, "/metrics", "root").text


# ---- endpoint x role: the whole table -------------------------------------------------------------

ROLE_KEYS = {"none": None, "generate": "acme-gen", "publish": "acme-pub", "admin": "root"}
GLOBEX_GRID = {**small_request(), "grid": [{"brand_id": "globex", "weights": [0, 0.5]}]}
OPENAI_GLOBEX = {"prompt": "a cup", "size": "64x64", "num_inference_steps": 2, "brand_id": "globex"}
# endpoint -> (none, generate, publish, admin), as docs/tenants.md states it ("acme" is the keys' brand)
MATRIX = {
    "GET /health": (200, 200, 200, 200),
    "GET /": (401, 200, 200, 200),
    "POST /generate (base model)": (401, 200, 200, 200),
    "POST /generate brand_id=acme": (401, 200, 200, 200),
    "POST /generate brand_id=globex": (401, 403, 403, 200),
    "POST /v1/images/generations brand_id=globex": (401, 403, 403, 200),
    "POST /ab-test grid globex": (401, 403, 403, 200),
    "GET /lora/list": (401, 200, 200, 200),
    "GET /lora/acme/metadata": (401, 200, 200, 200),
    "GET /lora/globex/metadata": (401, 404, 404, 200),
    "GET /lora/globex/ab-results": (401, 404, 404, 200),
    "GET /ab-test/{a globex test}": (401, 404, 404, 200),
    "GET /lora/cache/stats": (401, 200, 200, 200),
    "POST /lora/acme/versions (upload)": (401, 403, 201, 201),
    "DELETE /lora/acme/versions/{uploaded}": (401, 403, 204, 204),
    "POST /lora/globex/versions (upload)": (401, 403, 403, 201),
    "POST /lora/acme/train (empty dataset)": (401, 403, 422, 422),
    "POST /lora/globex/train (empty dataset)": (401, 403, 403, 422),
    "GET /train/jobs": (401, 403, 200, 200),
    "POST /lora/cache/clear": (401, 403, 403, 200),
    "GET /metrics": (401, 403, 403, 200),
}


def matrix_calls(c, h, lora, empty_zip, ab_test) -> dict:
    """Each endpoint of MATRIX as a call with the headers `h` (the delete is made after the upload)."""
    return {
        "GET /health": lambda: c.get("/health", headers=h),
        "GET /": lambda: c.get("/", headers=h),
        "POST /generate (base model)": lambda: c.post("/generate", json=small_request(), headers=h),
        "POST /generate brand_id=acme": lambda: c.post("/generate", json=small_request(brand_id="acme"), headers=h),
        "POST /generate brand_id=globex": lambda: c.post("/generate", json=small_request(brand_id="globex"), headers=h),
        "POST /v1/images/generations brand_id=globex": lambda: c.post(
            "/v1/images/generations", json=OPENAI_GLOBEX, headers=h
        ),
        "POST /ab-test grid globex": lambda: c.post("/ab-test", json=GLOBEX_GRID, headers=h),
        "GET /lora/list": lambda: c.get("/lora/list", headers=h),
        "GET /lora/acme/metadata": lambda: c.get("/lora/acme/metadata", headers=h),
        "GET /lora/globex/metadata": lambda: c.get("/lora/globex/metadata", headers=h),
        "GET /lora/globex/ab-results": lambda: c.get("/lora/globex/ab-results", headers=h),
        "GET /ab-test/{a globex test}": lambda: c.get(f"/ab-test/{ab_test}", headers=h),
        "GET /lora/cache/stats": lambda: c.get("/lora/cache/stats", headers=h),
        "POST /lora/acme/versions (upload)": lambda: c.post("/lora/acme/versions", files=lora, headers=h),
        "DELETE /lora/acme/versions/{uploaded}": None,
        "POST /lora/globex/versions (upload)": lambda: c.post("/lora/globex/versions", files=lora, headers=h),
        "POST /lora/acme/train (empty dataset)": lambda: c.post("/lora/acme/train", files=empty_zip, headers=h),
        "POST /lora/globex/train (empty dataset)": lambda: c.post("/lora/globex/train", files=empty_zip, headers=h),
        "GET /train/jobs": lambda: c.get("/train/jobs", headers=h),
        "POST /lora/cache/clear": lambda: c.post("/lora/cache/clear", headers=h),
        "GET /metrics": lambda: c.get("/metrics", headers=h),
    }


def test_endpoint_by_role(server):
    ab_test = post(server, "/ab-test", "root", json=GLOBEX_GRID).json()["test_id"]
    c = server.client
    seen: dict[str, list[int]] = {endpoint: [] for endpoint in MATRIX}
    for key in ROLE_KEYS.values():
        h = auth(key) if key else {}
        lora = {"file": ("new.safetensors", server.lora_file.read_bytes())}
        empty_zip = {"dataset": ("d.zip", b"")}
        calls = matrix_calls(c, h, lora, empty_zip, ab_test)
        for endpoint, call in calls.items():
            if call is None:
                continue
            r = call()
            seen[endpoint].append(r.status_code)
            if endpoint == "POST /lora/acme/versions (upload)":
                version = r.json()["version"] if r.status_code == 201 else "v1"
                seen["DELETE /lora/acme/versions/{uploaded}"].append(
                    c.delete(f"/lora/acme/versions/{version}", headers=h).status_code
                )
            if endpoint == "POST /lora/globex/versions (upload)" and r.status_code == 201:
                assert c.delete(f"/lora/globex/versions/{r.json()['version']}", headers=h).status_code == 204
    table = "\n".join(f"| {e} | " + " | ".join(map(str, s)) + " |" for e, s in seen.items())
    print("\n| endpoint | none | generate | publish | admin |\n|---|---|---|---|---|\n" + table)
    assert {e: tuple(s) for e, s in seen.items()} == MATRIX


# ---- the route table ------------------------------------------------------------------------------


def test_every_route_of_the_app_has_a_deliberate_role():
    from app.config import Settings
    from app.main import create_app

    app = create_app(Settings(lora_base_dir=Path("/nonexistent"), log_level="warning"))
    # The OpenAPI paths: `app.routes` holds included routers as opaque objects in this FastAPI.
    routes = {(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item}
    assert ("POST", "/generate") in routes
    missing = routes - set(ROUTE_ROLES) - {("GET", "/health"), ("GET", "/ready"), ("GET", "/ui/defaults")}
    assert not missing, f"routes without a role in ROUTE_ROLES (they need admin until listed): {sorted(missing)}"


def test_a_service_subclass_cannot_skip_the_callers_checks():
    from app.service import GenerationService

    with pytest.raises(TypeError, match="override _generate"):

        class Sloppy(GenerationService):  # noqa: F841
            async def generate(self, spec, loras, strict=False, disconnected=None):
                return None


# ---- reloads (last: they rewrite the keys file) ---------------------------------------------------


def wait_for_status(server, key: str, status: int) -> float:
    start = time.monotonic()
    while (r := get(server, "/lora/list", key)).status_code != status:
        assert time.monotonic() - start < RELOAD_DEADLINE_S, f"{key}: still {r.status_code}, wanted {status}"
        time.sleep(0.05)
    return time.monotonic() - start


def replace_file(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_a_new_key_works_and_a_removed_one_is_refused_within_5_s_without_a_restart(server):
    pid = server.pid
    assert get(server, "/lora/list", "newcomer").status_code == 401
    replace_file(server.keys_file, keys_toml({**ENTRIES, "newcomer": (["acme"], ["generate"], 0)}))
    wait_for_status(server, "newcomer", 200)
    without = {k: v for k, v in ENTRIES.items() if k != "acme-pub"}
    replace_file(server.keys_file, keys_toml({**without, "newcomer": (["acme"], ["generate"], 0)}))
    wait_for_status(server, "acme-pub", 401)
    assert server.process.poll() is None and server.pid == pid


def test_a_broken_file_on_reload_keeps_the_last_good_keys_and_logs_the_line(server):
    good = server.keys_file.read_text()
    broken = good + '\n[[key]]\nname = "oops"\nsha256 = not-quoted\n'
    line = len(broken.splitlines())
    replace_file(server.keys_file, broken)
    wait_for_log(server, f"(at line {line}")
    assert "keeping the last good" in server.log()
    assert get(server, "/lora/list", "newcomer").status_code == 200
    assert get(server, "/lora/list", "root").status_code == 200
    replace_file(server.keys_file, keys_toml(ENTRIES))  # good again: newcomer is gone
    wait_for_status(server, "newcomer", 401)


def test_sighup_reloads_a_change_the_mtime_does_not_show(server):
    entries = {**ENTRIES, "acme-pub": (["acme*"], ["publish"], 0)}
    text = keys_toml(entries)
    server.keys_file.write_text(text)
    wait_for_status(server, "acme-pub", 200)
    st = os.stat(server.keys_file)
    # The same size, inode and mtime: only SIGHUP can tell the watcher to read it.
    swapped = text.replace(key_digest(KEYS["acme-pub"]), key_digest(KEYS["newcomer"]))
    with open(server.keys_file, "r+") as f:
        f.write(swapped)
    os.utime(server.keys_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.kill(server.pid, signal.SIGHUP)
    wait_for_status(server, "newcomer", 200)
    assert get(server, "/lora/list", "acme-pub").status_code == 401
    assert "reloaded (SIGHUP)" in server.log()


def test_the_log_never_holds_a_key_and_every_access_line_names_one(server):
    log = server.log()
    for key in KEYS.values():
        assert key not in log
    access = [line for line in log.splitlines() if "app.access:" in line]
    assert access and all(re.search(r" key=\S+", line) for line in access)
    assert any(" key=acme-gen" in line for line in access) and any(" key=-" in line for line in access)
    docs = get(server, "/openapi.json", "root").text
    assert not any(k in docs for k in KEYS.values())


def test_a_bad_keys_file_at_start_stops_the_service(tmp_path):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text('[[key]]\nname = "x"\nsha256 = "abc"\nbrands = ["*"]\nroles = ["generate"]\n')
    env = {k: v for k, v in os.environ.items() if k != "API_KEY"} | {
        "API_KEYS_FILE": str(keys_file), "PYTHONPATH": str(PROJECT_ROOT), "LOG_LEVEL": "warning",
    }  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "uvicorn", "app.main:app", "--port", "1"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "Invalid configuration: API_KEYS_FILE" in result.stderr and "line 1" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_python_m_app_keys_new_prints_the_key_once_and_a_block_the_service_accepts(tmp_path):
    command = [sys.executable, "-m", "app.keys", "new", "--name", "acme-web", "--brands", "acme*"]
    command += ["--roles", "generate"]
    out = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = re.search(r"^\s+(bis_\S+)$", out.stdout, re.M).group(1)
    assert out.stdout.count(key) == 1
    block = out.stdout[out.stdout.index("[[key]]") :]
    from app.access import parse_keys

    [(digest, caller)] = parse_keys(block)
    assert digest == key_digest(key) and caller.name == "acme-web" and caller.brands == ("acme*",)
    assert caller.may_use("acme-shoes") and not caller.may_use("globex") and not caller.has("publish")
    assert json.dumps(caller.name) in block


def test_a_request_pays_one_token_per_image_its_first_on_its_own_token():
    from app.access import Caller, TokenBucket, acting_as, charge_images, prepay_images
    from app.errors import RateLimited

    now = [0.0]
    bucket = TokenBucket(6, clock=lambda: now[0])  # 6 a minute: one token every 10 s
    caller = Caller("k", ("*",), frozenset({"generate"}), 6, bucket=bucket)
    assert bucket.take(1) == 0.0  # the request's own token (the middleware takes it)
    with acting_as(caller, credit=1):
        prepay_images(caller, 3)  # 2 more from the bucket
        assert bucket.tokens == 3
        for _ in range(3):
            charge_images(caller, 1)  # paid already: the bucket is not touched
        assert bucket.tokens == 3
        charge_images(caller, 3)
        assert bucket.tokens == 0
        with pytest.raises(RateLimited) as refused:
            charge_images(caller, 2)
        assert refused.value.retry_after_s == 20 and bucket.tokens == 0  # nothing taken
    now[0] = 10.0
    assert bucket.take(1) == 0.0 and bucket.take(1) == pytest.approx(10.0)
