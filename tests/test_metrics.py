"""GET /metrics after a scripted set of requests: counters move by exactly what was done, and agree with
/lora/cache/stats. X-Request-ID is echoed when valid and generated otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.lora.synthetic import random_lora_state_dict, target_layers, write_lora
from app.main import create_app

REQUEST = {"prompt": "a red coffee cup", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 5}


def samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from /metrics."""
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def requests_count(metrics: dict, method: str, endpoint: str, status: int) -> float:
    labels = (("endpoint", endpoint), ("method", method), ("status", str(status)))
    return metrics.get(("http_requests_total", labels), 0.0)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A fresh app that served: base, brand (miss + load), brand again (hit), unknown brand (miss), a 422."""
    work = tmp_path_factory.mktemp("metrics")
    app = create_app(Settings(lora_base_dir=work / "loras", data_dir=work / "data", log_level="warning"))
    with TestClient(app) as c:
        state = app.state.service_state
        assert state.wait_ready(120), state.load_error
        layers = target_layers(state.engine.pipe.unet, state.engine.pipe.text_encoder)
        write_lora(Path(state.registry.root) / "acme" / "style.safetensors", random_lora_state_dict(layers, seed=1))
        before = samples(c)
        statuses = [
            c.post("/generate", json=REQUEST).status_code,
            c.post("/generate", json={**REQUEST, "brand_id": "acme"}).status_code,
            c.post("/generate", json={**REQUEST, "brand_id": "acme", "lora_weights": 0.5}).status_code,
            c.post("/generate", json={**REQUEST, "brand_id": "nobody"}).status_code,
            c.post("/generate", json={**REQUEST, "width": 65}).status_code,
        ]
        assert statuses == [200, 200, 200, 200, 422]
        yield c, before, samples(c)


def test_request_counters_by_endpoint_and_status(scripted):
    _, before, after = scripted
    assert requests_count(before, "POST", "/generate", 200) == 0
    assert requests_count(after, "POST", "/generate", 200) == 4
    assert requests_count(after, "POST", "/generate", 422) == 1
    assert requests_count(after, "POST", "/generate", 500) == 0
    # The scrape before the script was itself counted, under its own endpoint.
    assert requests_count(after, "GET", "/metrics", 200) == 1
    latency = ("http_request_duration_seconds_count", (("endpoint", "/generate"),))
    assert after[latency] == 5


def test_generation_latency_histogram_counts_each_image(scripted):
    _, before, after = scripted
    assert before[("generation_duration_seconds_count", ())] == 0
    assert after[("generation_duration_seconds_count", ())] == 4
    assert after[("generation_duration_seconds_sum", ())] > 0
    assert after[("generation_duration_seconds_bucket", (("le", "+Inf"),))] == 4


def test_cache_counters_match_cache_stats(scripted):
    client, _, after = scripted
    stats = client.get("/lora/cache/stats").json()
    assert (stats["hits"], stats["misses"], stats["size"]) == (1, 2, 1)
    assert after[("lora_cache_hits_total", ())] == stats["hits"]
    assert after[("lora_cache_misses_total", ())] == stats["misses"]
    assert after[("lora_cache_size", ())] == stats["size"]
    assert after[("lora_cache_evictions_total", ())] == stats["evictions"] == 0


def test_lora_loads_queue_depth_and_resident_adapters(scripted):
    _, before, after = scripted
    assert before[("lora_loads_total", ())] == 0
    assert after[("lora_loads_total", ())] == 1
    assert after[("lora_load_seconds_total", ())] > 0
    assert after[("generation_queue_depth", ())] == 0
    assert after[("lora_resident_adapters", ())] == 1
    assert after[("lora_invalid_files", ())] == 0


def test_cache_clear_shows_in_the_gauges(scripted):
    client, _, _ = scripted
    assert client.post("/lora/cache/clear").json() == {"cleared": 1}
    after = samples(client)
    assert after[("lora_cache_size", ())] == 0
    assert after[("lora_resident_adapters", ())] == 0
    assert requests_count(after, "POST", "/lora/cache/clear", 200) == 1


def test_request_id_is_echoed_when_given(scripted):
    client, _, _ = scripted
    for given in ("abc-123", "trace:42.7_x", "a" * 128):
        r = client.get("/health", headers={"X-Request-ID": given})
        assert r.headers["x-request-id"] == given
    r = client.post("/generate", json={**REQUEST, "width": 65}, headers={"X-Request-ID": "req-422"})
    assert r.status_code == 422 and r.headers["x-request-id"] == "req-422"


@pytest.mark.parametrize("given", [None, "", "has space", "a" * 129, "semi;colon", "new\tline", "ünï"])
def test_request_id_is_generated_when_absent_or_invalid(scripted, given):
    client, _, _ = scripted
    headers = {} if given is None else {"X-Request-ID": given.encode("utf-8")}
    first = client.get("/health", headers=headers).headers["x-request-id"]
    second = client.get("/health", headers=headers).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first), first
    assert first != second and first != given
