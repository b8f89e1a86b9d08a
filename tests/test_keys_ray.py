"""Brand-scoped keys under Ray Serve: the ingress refuses a forbidden brand (403) and a key over its
rate (429) before any replica works. One replica on a local Ray instance (start ~30 s).

Skipped when ray is not installed (`pip install .[ray]`; scripts/setup.sh installs it).
"""

from __future__ import annotations

import re

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from app.access import key_digest  # noqa: E402
from app.keys import toml_block  # noqa: E402
from tests.conftest import ray_app, small_request, test_settings  # noqa: E402

pytestmark = pytest.mark.slow

APP_NAME = "brand-images-keys-test"
KEYS = {"acme-gen": "bis_ray_gen_0123456789abcdefghijklmnop", "root": "bis_ray_adm_0123456789abcdefghijklmnop",
        "slow": "bis_ray_slo_0123456789abcdefghijklmnop"}  # fmt: skip


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def cluster(model_cache_dir, tmp_path_factory, make_brand):
    work = tmp_path_factory.mktemp("ray-keys")
    make_brand(work / "loras", "acme", seed=1)
    make_brand(work / "loras", "globex", seed=2)
    keys_file = work / "keys.toml"
    keys_file.write_text(
        toml_block("acme-gen", key_digest(KEYS["acme-gen"]), ["acme"], ["generate"], 0)
        + toml_block("root", key_digest(KEYS["root"]), ["*"], ["admin"], 0)
        + toml_block("slow", key_digest(KEYS["slow"]), ["acme"], ["generate"], 1)
    )
    settings = test_settings(
        model_cache_dir, work / "loras", data_dir=work / "data", api_keys_file=keys_file, torch_threads=1,
        ray_replicas=1, ray_replica_cpus=1, request_timeout_s=60,
    )  # fmt: skip
    with ray_app(settings, APP_NAME, num_cpus=2) as client:
        yield client


def replica_images(client) -> float:
    """Images the replicas generated (generation_duration_seconds_count summed over replicas)."""
    text = client.get("/metrics", headers=auth("root")).text
    return sum(float(v) for v in re.findall(r"^generation_duration_seconds_count\{[^}]*\} ([0-9.e+]+)$", text, re.M))


def test_the_ingress_refuses_before_any_replica_works(cluster):
    assert cluster.post("/generate", json=small_request(brand_id="acme"), headers=auth("acme-gen")).status_code == 200
    before = replica_images(cluster)
    assert before >= 1
    for brand in ("globex", "initech"):
        for body in (small_request(brand_id=brand), small_request(prompt=f"a cup <lora:{brand}:0.5>")):
            r = cluster.post("/generate", json=body, headers=auth("acme-gen"))
            assert r.status_code == 403 and f"brand '{brand}'" in r.text, r.text
        ab = {**small_request(), "grid": [{"brand_id": brand, "weights": [0, 0.5]}]}
        assert cluster.post("/ab-test", json=ab, headers=auth("acme-gen")).status_code == 403
    assert cluster.get("/lora/globex/metadata", headers=auth("acme-gen")).status_code == 404
    assert [e["brand_id"] for e in cluster.get("/lora/list", headers=auth("acme-gen")).json()["data"]] == ["acme"]
    stats = cluster.get("/lora/cache/stats", headers=auth("acme-gen")).json()
    assert all(k.startswith("acme") for r in stats["replicas"].values() for k in r["cached"])
    assert cluster.get("/metrics", headers=auth("acme-gen")).status_code == 403
    # a key over its rate (1 a minute): the second image is a 429 at the ingress
    assert cluster.post("/generate", json=small_request(), headers=auth("slow")).status_code == 200
    limited = cluster.post("/generate", json=small_request(), headers=auth("slow"))
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert replica_images(cluster) == before + 1  # only the slow key's first image
