"""LoraCache as scripted scenarios: counters, LRU order, evictions, and pinned (preloaded) entries."""

from __future__ import annotations

import pytest

from app.lora.cache import LoraCache


def make_cache(max_size: int = 2) -> LoraCache[str]:
    return LoraCache(max_size)


def load(cache: LoraCache[str], key: str) -> list[str]:
    """What the manager does per request: look up, and put the loaded value on a miss. Returns evicted keys."""
    if cache.lookup(key) is None:
        return [k for k, _ in cache.put(key, f"weights-{key}")]
    return []


def test_scripted_sequence_gives_exact_counters_and_lru_order():
    cache = make_cache(max_size=2)

    evicted = [e for key in ["a", "b", "a", "c", "b", "b", "a"] for e in load(cache, key)]

    stats = cache.stats()
    # a miss, b miss, a hit, c miss (evicts b), b miss (evicts a), b hit, a miss (evicts c)
    assert (stats.hits, stats.misses, stats.evictions) == (2, 5, 3)
    assert evicted == ["b", "a", "c"]
    assert stats.cached == ["b", "a"]  # least recently used first
    assert stats.size == 2 and stats.max_size == 2
    assert stats.hit_rate == pytest.approx(2 / 7)


def test_a_hit_makes_the_entry_most_recently_used():
    cache = make_cache(max_size=2)
    load(cache, "a")
    load(cache, "b")
    load(cache, "a")  # now b is the least recently used

    evicted = cache.put("c", "weights-c")

    assert evicted == [("b", "weights-b")]
    assert cache.keys() == ["a", "c"]


def test_peek_neither_counts_nor_reorders():
    cache = make_cache(max_size=2)
    load(cache, "a")
    load(cache, "b")

    assert cache.peek("a") == "weights-a"
    assert cache.peek("zzz") is None

    stats = cache.stats()
    assert (stats.hits, stats.misses) == (0, 2)
    assert stats.cached == ["a", "b"]


def test_clear_returns_the_count_is_not_an_eviction_and_counters_keep_counting():
    cache = make_cache(max_size=3)
    for key in ["a", "b", "a"]:
        load(cache, key)

    assert cache.clear() == 2
    assert cache.clear() == 0  # clearing twice is harmless
    load(cache, "a")

    stats = cache.stats()
    assert stats.evictions == 0
    assert (stats.hits, stats.misses) == (1, 3)
    assert stats.cached == ["a"]


def test_remove_is_not_an_eviction_and_is_idempotent():
    cache = make_cache(max_size=2)
    load(cache, "a")

    assert cache.remove("a") is True
    assert cache.remove("a") is False

    stats = cache.stats()
    assert stats.evictions == 0 and stats.size == 0 and "a" not in cache


def test_hit_rate_is_zero_when_nothing_was_looked_up():
    stats = make_cache().stats()

    assert stats.hit_rate == 0.0
    assert (stats.hits, stats.misses, stats.evictions, stats.size, stats.cached, stats.pinned) == (0, 0, 0, 0, [], [])


def test_valid_predicate_drops_a_stale_entry_and_counts_a_miss():
    cache = make_cache(max_size=2)
    load(cache, "a")
    load(cache, "b")

    assert cache.lookup("a", valid=lambda value: value != "weights-a") is None
    assert cache.lookup("b", valid=lambda value: True) == "weights-b"

    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (1, 3, 0)
    assert stats.cached == ["b"]


def test_replacing_a_key_is_not_an_eviction():
    cache = make_cache(max_size=2)
    cache.put("a", "old")

    assert cache.put("a", "new") == []

    assert cache.peek("a") == "new"
    assert cache.stats().evictions == 0


def test_record_miss_counts_a_lookup_that_never_reached_the_cache():
    cache = make_cache()

    cache.record_miss()

    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.hit_rate) == (0, 1, 0.0)


def test_size_below_one_is_refused():
    with pytest.raises(ValueError, match="max_size"):
        LoraCache(0)


# ---- pinned entries (preloaded brands) -------------------------------------------------------------


def test_pinned_entries_are_never_evicted_and_do_not_count_against_the_size():
    cache = make_cache(max_size=2)
    load(cache, "preloaded")
    assert cache.pin("preloaded") is True
    assert cache.pin("absent") is False

    evicted = [e for key in ["a", "b", "c", "d"] for e in load(cache, key)]

    stats = cache.stats()
    assert evicted == ["a", "b"]  # the LRU holds two traffic adapters beside the pinned one
    assert stats.cached == ["preloaded", "c", "d"] and stats.pinned == ["preloaded"]
    assert stats.size == 3 and stats.evictions == 2
    assert cache.lookup("preloaded") == "weights-preloaded"


def test_clear_keeps_pinned_entries_and_remove_unpins():
    cache = make_cache(max_size=2)
    load(cache, "preloaded")
    cache.pin("preloaded")
    load(cache, "a")

    assert cache.clear() == 1
    assert cache.keys() == ["preloaded"]

    assert cache.remove("preloaded") is True  # its file is gone: nothing left to pin
    assert cache.stats().pinned == [] and cache.keys() == []


# ---- capacity by weight (the host tier counts bytes) -------------------------------------------------


def test_a_weighed_cache_evicts_by_total_weight_and_take_moves_an_entry_out():
    cache: LoraCache[bytes] = LoraCache(10, weigh=len)
    cache.put("a", b"x" * 4)
    cache.put("b", b"x" * 4)

    evicted = cache.put("c", b"x" * 5)  # 13 > 10: the least recently used goes

    assert [k for k, _ in evicted] == ["a"] and cache.used() == 9
    assert cache.take("b") == b"x" * 4 and "b" not in cache
    assert cache.take("b") is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (1, 1, 1)
    assert [k for k, _ in cache.put("huge", b"x" * 11)] == ["c", "huge"]  # larger than the whole cache
