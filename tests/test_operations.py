"""Operations, against a real uvicorn process where it matters: one access log line per request (text
or JSON), preloaded brands pinned in the cache, SIGTERM draining, and the generation watchdog."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import small_request

# A request that keeps the worker busy for a few seconds on the embedded model (256x256, 8 steps).
SLOW_REQUEST = small_request(width=256, height=256, num_inference_steps=8)


def wait_until(condition, timeout_s: float = 30, what: str = "the condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def queue_depth(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    return float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("generation_queue_depth ")))


def in_background(fn):
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, result


# ---- access log ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_json_access_line_per_request_with_id_brands_and_timings(start_server, tmp_path, make_brand):
    make_brand(tmp_path / "server" / "loras", "acme", seed=3)
    server = start_server(tmp_path / "server", LOG_LEVEL="info", LOG_FORMAT="json")

    ok = httpx.post(f"{server.url}/generate", json=small_request(brand_id="acme"), headers={"X-Request-ID": "trace-42"})
    bad = httpx.post(f"{server.url}/generate", json=small_request(width=65), headers={"X-Request-ID": "trace-43"})
    assert ok.status_code == 200 and bad.status_code == 422

    def access_lines():
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        return [line for line in lines if line["logger"] == "app.access" and line["request_id"].startswith("trace-")]

    lines = wait_until(lambda: len(access_lines()) == 2 and access_lines(), what="two access lines")
    generated, refused = sorted(lines, key=lambda line: line["request_id"])
    timings = ok.json()["timings"]
    assert generated["method"] == "POST" and generated["path"] == "/generate" and generated["status"] == 200
    assert generated["brands"] == ["acme"] and generated["images"] == 1
    assert generated["queue_ms"] == timings["queue_ms"] and generated["generation_ms"] == timings["generation_ms"]
    assert generated["lora_ms"] == timings["lora_ms"] > 0  # a cold load
    assert refused["status"] == 422 and "brands" not in refused


@pytest.mark.slow
def test_text_access_line_carries_the_request_id(start_server):
    server = start_server(LOG_LEVEL="info")

    httpx.get(f"{server.url}/lora/list", headers={"X-Request-ID": "trace-text-1"})

    line = wait_until(
        lambda: next((x for x in server.log().splitlines() if "[trace-text-1] app.access" in x), None),
        what="the access line",
    )
    assert "method=GET path=/lora/list status=200" in line


# ---- preloaded brands are pinned -------------------------------------------------------------------


def test_preloaded_brand_is_pinned_never_evicted_and_not_counted(make_client, lora_root, make_brand):
    for i, brand in enumerate(["acme", "b", "c", "d"]):
        make_brand(lora_root, brand, seed=60 + i)
    with make_client(lora_root, lora_preload_brands="acme", lora_cache_max_size=2) as client:
        state = client.app.state.service_state
        loads_after_start = state.loras.loads
        for brand in ["b", "c", "d"]:
            assert client.post("/generate", json=small_request(brand_id=brand)).status_code == 200
        stats = client.get("/lora/cache/stats").json()
        acme = client.post("/generate", json=small_request(brand_id="acme"))
        cleared = client.post("/lora/cache/clear").json()
        after_clear = client.get("/lora/cache/stats").json()

    assert stats["pinned"] == ["acme"]
    assert stats["cached"] == ["acme", "c", "d"] and stats["size"] == 3 and stats["max_size"] == 2
    assert stats["evictions"] == 1  # b made room for d; acme did not count against the two places
    assert acme.status_code == 200 and state.loras.loads == loads_after_start + 3  # acme was not read again
    # Cleared: c and d from the device and b from the host tier; the pinned brand stays.
    assert cleared == {"cleared": 3} and after_clear["cached"] == ["acme"] and after_clear["pinned"] == ["acme"]
    assert after_clear["host"]["cached"] == []


# ---- SIGTERM drains ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_refuses_new_work_finishes_accepted_work_and_exits_zero(start_server):
    server = start_server(SHUTDOWN_GRACE_S="120", LOG_LEVEL="info")
    slow_thread, slow = in_background(lambda: httpx.post(f"{server.url}/generate", json=SLOW_REQUEST, timeout=120))
    wait_until(lambda: queue_depth(server.url) >= 1, what="the slow request to be accepted")

    server.process.send_signal(signal.SIGTERM)
    ready = wait_until(
        lambda: (r := httpx.get(f"{server.url}/ready", timeout=5)).status_code == 503 and r, what="/ready to be 503"
    )
    refused = httpx.post(f"{server.url}/generate", json=small_request(), timeout=30)
    still_busy = queue_depth(server.url)
    slow_thread.join(120)

    assert ready.json()["status"] == "draining"
    assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
    assert still_busy >= 1  # refused at once: the accepted one was still running after the answer came
    assert slow["value"].status_code == 200, slow["value"].text
    assert server.process.wait(60) == 0, server.log()[-2000:]
    assert "draining" in server.log()


# ---- the watchdog ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_without_progress_turns_ready_503_and_is_logged(start_server):
    # One denoising step at 512x512, then decoding: seconds without a step's progress on a CPU, which
    # stands in for a hung GPU once WATCHDOG_S is shorter than that.
    server = start_server(WATCHDOG_S="0.3", LOG_LEVEL="info")
    long_thread, long_request = in_background(
        lambda: httpx.post(
            f"{server.url}/generate", json=small_request(width=512, height=512, num_inference_steps=1), timeout=120
        )
    )

    stalled = wait_until(
        lambda: (r := httpx.get(f"{server.url}/ready", timeout=5)).status_code == 503 and r,
        what="/ready to report the stall",
    )
    long_thread.join(120)
    recovered = httpx.get(f"{server.url}/ready", timeout=5)

    assert stalled.json()["status"] == "stalled" and "WATCHDOG_S" in stalled.json()["detail"]
    assert long_request["value"].status_code == 200
    assert recovered.status_code == 200  # idle again: no work waiting is no stall
    assert "watchdog: the generation worker has made no progress" in server.log()
