"""Many clients at once, with evictions happening while others generate: every image is still its
serial image. Unbatched, bit for bit; batched (several images per denoising loop, LoRA sets mixed),
within 1 level of 255 per pixel: batched kernels round differently than a batch of one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import pixels, png_bytes, small_request

BRANDS = [None, "a", "b", "c"]  # None: the base model
SEEDS = [1, 2]
THREADS = 8
REPEATS = 3  # 4 brands x 2 seeds x 3 = 24 requests


@pytest.mark.parametrize("batch_max_size", [1, 4])
def test_concurrent_requests_match_the_serial_reference(make_client, lora_root, make_brand, batch_max_size):
    for brand, seed in [("a", 31), ("b", 32), ("c", 33)]:
        make_brand(lora_root, brand, seed=seed)
    combos = [(brand, seed) for brand in BRANDS for seed in SEEDS]

    def request(combo):
        brand, seed = combo
        body = small_request(seed=seed, **({"brand_id": brand} if brand else {}))
        return combo, client.post("/generate", json=body)

    settings = dict(lora_cache_max_size=2, lora_host_cache_mb=0, max_queue_size=64, batch_max_size=batch_max_size)
    with make_client(lora_root, **settings) as client:
        serial = {}
        for combo in combos:
            _, response = request(combo)
            assert response.status_code == 200, response.text
            serial[combo] = response.json()["image"]
        assert len(set(serial.values())) == len(combos), "every (brand, seed) should give its own image"
        evictions_before = client.get("/lora/cache/stats").json()["evictions"]

        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(request, combos * REPEATS))

        assert len(results) == 24
        batch_sizes = []
        for combo, response in results:
            assert response.status_code == 200, (combo, response.text)
            body = response.json()
            batch_sizes.append(body["batch_size"])
            if body["batch_size"] == 1:
                assert body["image"] == serial[combo], f"{combo} differs from its serial image"
            else:
                diff = np.abs(pixels(png_bytes(body["image"])) - pixels(png_bytes(serial[combo]))).max()
                assert diff <= 1, f"{combo} differs from its serial image by {diff} levels in a batch"
            assert [x["brand_id"] for x in body["loras"]] == ([combo[0]] if combo[0] else [])
        assert max(batch_sizes) == 1 if batch_max_size == 1 else max(batch_sizes) > 1, batch_sizes
        final = client.get("/lora/cache/stats").json()
        assert final["evictions"] > evictions_before, "the cache of 2 should have evicted during the run"
        assert final["hits"] + final["misses"] == 3 * len(SEEDS) * (1 + REPEATS)  # one lookup per brand request
        assert final["size"] <= 2
