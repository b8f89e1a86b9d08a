"""The resident LoRA cache behind the API: exact stats, preload, clear, file changes, disabled cache, bad files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import count_reader_hashes, generate, png_bytes, sha256_of, small_request


def stats(client) -> dict:
    response = client.get("/lora/cache/stats")
    assert response.status_code == 200
    return response.json()


def app_state(client):
    return client.app.state.service_state


def count_engine_reads(monkeypatch, client) -> list[str]:
    """Record every LoRA file the app's engine reads (by brand folder), by wrapping its read_adapter."""
    engine = app_state(client).engine
    calls: list[str] = []
    real = engine.read_adapter

    def counting(path, header=None, known_sha256=None):
        calls.append(Path(path).parent.name)
        return real(path, header, known_sha256)

    monkeypatch.setattr(engine, "read_adapter", counting)
    return calls


@pytest.fixture
def three_brands(lora_root, make_brand) -> dict:
    return {brand: make_brand(lora_root, brand, seed=seed) for brand, seed in [("a", 1), ("b", 2), ("c", 3)]}


def test_scripted_sequence_gives_exact_stats(make_client, lora_root, three_brands):
    with make_client(lora_root, lora_cache_max_size=2, lora_host_cache_mb=0) as c:
        for brand in ["a", "b", "a", "c", "b", None, "zzz"]:
            generate(c, **({"brand_id": brand} if brand else {}))

        # a miss, b miss, a hit, c miss (evicts b), b miss (evicts a), base: no lookup, zzz: not found = miss
        assert stats(c) == {
            "enabled": True,
            "max_size": 2,
            "size": 2,
            "cached": ["c", "b"],
            "pinned": [],
            "host": None,
            "hits": 1,
            "misses": 5,
            "evictions": 2,
            "hit_rate": pytest.approx(1 / 6),
        }
        # Evicted adapters are released by the engine, not just forgotten by the cache.
        assert sorted(app_state(c).loras.resident_adapters()) == ["b", "c"]


def test_evicted_brand_reloads_to_the_same_image(make_client, lora_root, three_brands, expected_png):
    with make_client(lora_root, lora_cache_max_size=1) as c:
        first = generate(c, brand_id="a")
        generate(c, brand_id="b")  # evicts a
        again = generate(c, brand_id="a")

        assert png_bytes(first["image"]) == expected_png(three_brands["a"], 0.8)
        assert again["image"] == first["image"]
        assert stats(c)["evictions"] == 2


def test_preload_loads_good_brands_and_survives_unknown_and_broken_ones(
    make_client, lora_root, make_brand, make_foreign_lora, make_lora, monkeypatch, expected_png
):
    good = make_brand(lora_root, "good", seed=4)
    broken = make_foreign_lora(lora_root / "broken" / "style.safetensors")

    with make_client(lora_root, lora_preload_brands="good,nope,broken") as c:
        ready = c.get("/ready")
        assert ready.status_code == 200
        preload = ready.json()["preload"]
        assert preload["good"] is None
        assert preload["nope"] and preload["broken"]
        assert "does not fit" in preload["broken"]
        after_start = stats(c)
        assert (after_start["cached"], after_start["hits"], after_start["misses"]) == (["good"], 0, 0)

        loads = count_engine_reads(monkeypatch, c)
        body = generate(c, brand_id="good")
        assert png_bytes(body["image"]) == expected_png(good, 0.8)
        assert loads == []  # served from the preloaded entry
        assert (stats(c)["hits"], stats(c)["misses"]) == (1, 0)

        # The broken file failed once at start-up: it is not read again until it changes.
        base = generate(c)
        for _ in range(2):
            refused = generate(c, brand_id="broken")
            assert refused["image"] == base["image"]
            assert refused["loras"] == []
            assert "broken" in refused["warnings"][0] and "does not fit" in refused["warnings"][0]
        assert loads == []
        assert app_state(c).facts.invalid_count() == 1

        # A fixed upload replaces it: read once, applied, and no longer invalid.
        fixed = make_lora(lora_root / "broken" / "fixed.tmp", seed=5)
        fixed.replace(broken)
        repaired = generate(c, brand_id="broken")
        assert loads == ["broken"]
        assert repaired["warnings"] == []
        assert repaired["loras"][0]["sha256"] == sha256_of(broken)
        assert png_bytes(repaired["image"]) == expected_png(broken, 0.8)
        assert app_state(c).facts.invalid_count() == 0


def test_garbage_file_gives_base_image_with_warning_and_is_not_reread(make_client, lora_root, monkeypatch):
    from app.lora import file_facts as file_facts_module

    garbage = lora_root / "junk" / "style.safetensors"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a safetensors file at all")
    header_reads: list[str] = []
    real_read = file_facts_module.read_lora_header
    counting = lambda path, limit: header_reads.append(path.name) or real_read(path, limit)  # noqa: E731
    monkeypatch.setattr(file_facts_module, "read_lora_header", counting)

    with make_client(lora_root) as c:
        base = generate(c)
        first = generate(c, brand_id="junk")
        second = generate(c, brand_id="junk")
        strict = c.post("/generate", json=small_request(brand_id="junk", strict=True))

    assert first["image"] == base["image"] and second["image"] == base["image"]
    assert "junk" in first["warnings"][0] and second["warnings"] == first["warnings"]
    assert header_reads == ["style.safetensors"]
    assert strict.status_code == 422
    assert strict.json()["detail"][0]["loc"] == ["body", "brand_id"]


def test_clear_empties_the_cache_keeps_counters_and_leaves_base_output_unchanged(
    make_client, lora_root, three_brands
):
    with make_client(lora_root) as c:
        base_before = generate(c)
        branded_before = generate(c, brand_id="a")
        generate(c, brand_id="b")
        generate(c, brand_id="a")
        before = stats(c)

        cleared = c.post("/lora/cache/clear")
        assert cleared.status_code == 200 and cleared.json() == {"cleared": 2}
        after = stats(c)
        assert (after["size"], after["cached"]) == (0, [])
        assert (after["hits"], after["misses"], after["evictions"]) == (before["hits"], before["misses"], 0)
        assert app_state(c).loras.resident_adapters() == []
        assert c.post("/lora/cache/clear").json() == {"cleared": 0}

        assert generate(c)["image"] == base_before["image"]
        assert generate(c, brand_id="a")["image"] == branded_before["image"]
        assert stats(c)["misses"] == before["misses"] + 1


def test_replaced_file_is_reloaded_on_the_next_request(make_client, lora_root, make_brand, make_lora, expected_png):
    path = make_brand(lora_root, "acme", seed=6)
    with make_client(lora_root) as c:
        old = generate(c, brand_id="acme")
        old_sha = sha256_of(path)

        # Rewritten in place: same size and inode, only the modification time tells it changed.
        new_content = make_lora(lora_root.parent / "new.safetensors", seed=7).read_bytes()
        path.write_bytes(new_content)
        new = generate(c, brand_id="acme")

        assert old["loras"][0]["sha256"] == old_sha
        assert new["loras"][0]["sha256"] == sha256_of(path) != old_sha
        assert png_bytes(new["image"]) == expected_png(path, 0.8)
        assert new["image"] != old["image"]
        assert (stats(c)["hits"], stats(c)["misses"], stats(c)["evictions"]) == (0, 2, 0)


def test_deleted_file_gives_the_base_image_with_a_warning(make_client, lora_root, make_brand):
    path = make_brand(lora_root, "acme", seed=8)
    with make_client(lora_root) as c:
        base = generate(c)
        branded = generate(c, brand_id="acme")
        path.unlink()

        after = generate(c, brand_id="acme")

        # The deleted file's weights are dropped, not kept resident until some eviction.
        assert stats(c)["cached"] == []
        assert app_state(c).loras.resident_adapters() == []

    assert branded["image"] != base["image"]
    assert after["image"] == base["image"]
    assert after["loras"] == []
    assert len(after["warnings"]) == 1 and "acme" in after["warnings"][0]


def test_disabled_cache_still_applies_loras_and_keeps_nothing(make_client, lora_root, three_brands, expected_png):
    with make_client(lora_root, lora_cache_enabled=False) as c:
        first = generate(c, brand_id="a")
        second = generate(c, brand_id="a")
        other = generate(c, brand_id="b")

        assert png_bytes(first["image"]) == expected_png(three_brands["a"], 0.8)
        assert second["image"] == first["image"]
        assert png_bytes(other["image"]) == expected_png(three_brands["b"], 0.8)
        current = stats(c)
        assert (current["enabled"], current["size"], current["cached"]) == (False, 0, [])
        assert (current["hits"], current["misses"]) == (0, 3)
        assert app_state(c).loras.resident_adapters() == []


def test_an_adapter_evicted_from_the_device_comes_back_from_the_host_tier(
    make_client, lora_root, three_brands, monkeypatch, expected_png
):
    with make_client(lora_root, lora_cache_max_size=1, lora_host_cache_mb=64) as c:
        loads = count_engine_reads(monkeypatch, c)
        first = generate(c, brand_id="a")
        generate(c, brand_id="b")  # a leaves the device, stays converted in the host tier
        again = generate(c, brand_id="a")
        body = c.get("/lora/cache/stats").json()
        metrics = c.get("/metrics").text

    assert loads == ["a", "b"]  # a was read from its file once
    assert png_bytes(again["image"]) == png_bytes(first["image"]) == expected_png(three_brands["a"], 0.8)
    assert body["cached"] == ["a"] and body["evictions"] == 2
    host = body["host"]
    assert host["cached"] == ["b"] and (host["hits"], host["misses"]) == (1, 2)  # device misses: a, b, then a
    assert 0 < host["used_mb"] <= host["max_mb"] == 64
    assert "lora_host_cache_hits_total 1.0" in metrics


def test_without_a_host_budget_an_evicted_adapter_is_read_again(make_client, lora_root, three_brands, monkeypatch):
    with make_client(lora_root, lora_cache_max_size=1, lora_host_cache_mb=0) as c:
        loads = count_engine_reads(monkeypatch, c)
        for brand in ["a", "b", "a"]:
            generate(c, brand_id=brand)
        body = c.get("/lora/cache/stats").json()

    assert loads == ["a", "b", "a"]
    assert body["host"] is None


def test_a_version_is_hashed_once_however_often_it_is_read(make_client, lora_root, three_brands, monkeypatch):
    # No start-up pass, no host tier, one place: every request below reads its file again.
    with make_client(lora_root, lora_cache_max_size=1, lora_host_cache_mb=0, lora_hash_on_start=False) as c:
        hashes = count_reader_hashes(monkeypatch)
        loads = count_engine_reads(monkeypatch, c)
        replies = [generate(c, brand_id=brand) for brand in ["a", "b", "a", "b"]]

    assert loads == ["a", "b", "a", "b"]
    assert hashes == [three_brands["a"].stat().st_size, three_brands["b"].stat().st_size]  # the first reads
    assert [r["loras"][0]["sha256"] for r in replies] == [sha256_of(three_brands[b]) for b in ["a", "b", "a", "b"]]


def test_brands_on_disk_are_hashed_at_start_up_not_on_their_first_miss(
    make_client, lora_root, three_brands, monkeypatch, expected_png
):
    hashes = count_reader_hashes(monkeypatch)
    with make_client(lora_root) as c:
        state = app_state(c)
        deadline = time.monotonic() + 30
        while not all(state.facts.known_sha256(f) for f in state.registry.latest_files()):
            assert time.monotonic() < deadline, "the start-up pass did not hash the brands' files"
            time.sleep(0.05)
        replies = {brand: generate(c, brand_id=brand) for brand in three_brands}

    assert hashes == []  # every first miss used the start-up pass's digest
    for brand, reply in replies.items():
        assert reply["loras"][0]["sha256"] == sha256_of(three_brands[brand])
        assert png_bytes(reply["image"]) == expected_png(three_brands[brand], 0.8)


def test_strict_refusal_of_a_missing_brand_says_what_happened_and_what_exists(make_client, lora_root, three_brands):
    version_dir = lora_root / "versioned" / "v1"
    version_dir.mkdir(parents=True)
    (version_dir / "style.safetensors").write_bytes(three_brands["a"].read_bytes())
    with make_client(lora_root) as c:
        missing = c.post("/generate", json=small_request(brand_id="nobody", strict=True))
        no_version = c.post("/generate", json=small_request(brand_id="versioned", version="v7", strict=True))
        fallback = generate(c, brand_id="nobody")

    assert missing.status_code == no_version.status_code == 422
    [error] = missing.json()["detail"]
    assert error["loc"] == ["body", "brand_id"]
    assert error["msg"] == (
        "LoRA 'nobody' cannot be applied: brand 'nobody' has no LoRA file; available brands: a, b, c, versioned; "
        "strict=true refuses to fall back to the base model"
    )
    assert "generated" not in error["msg"]  # nothing was generated
    assert no_version.json()["detail"][0]["msg"] == (
        "LoRA 'versioned' cannot be applied: brand 'versioned' has no version 'v7'; available versions: v1; "
        "strict=true refuses to fall back to the base model"
    )
    # Without strict the image is made, and then the warning says so.
    assert fallback["warnings"] == [
        "LoRA not found for brand_id: nobody; brand 'nobody' has no LoRA file; available brands: a, b, c, versioned; "
        "generated with the base model"
    ]
