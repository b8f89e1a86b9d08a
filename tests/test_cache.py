"""LoraCache as scripted scenarios against a fake owner that records what the cache hands back."""

from __future__ import annotations

import pytest

from app.lora.cache import LoraCache


class FakeOwner:
    """Stands in for the engine: records every entry the cache gives back (evicted, removed, cleared)."""

    def __init__(self):
        self.removed: list[tuple[str, str]] = []

    def __call__(self, key: str, value: str) -> None:
        self.removed.append((key, value))


@pytest.fixture
def owner() -> FakeOwner:
    return FakeOwner()


def make_cache(owner: FakeOwner, max_size: int = 2) -> LoraCache[str]:
    return LoraCache(max_size, on_remove=owner)


def load(cache: LoraCache[str], key: str) -> str:
    """What the manager does per request: look up, and put the loaded value on a miss."""
    value = cache.lookup(key)
    if value is None:
        value = f"weights-{key}"
        cache.put(key, value)
    return value


def test_scripted_sequence_gives_exact_counters_and_lru_order(owner):
    cache = make_cache(owner, max_size=2)

    for key in ["a", "b", "a", "c", "b", "b", "a"]:
        load(cache, key)

    stats = cache.stats()
    # a miss, b miss, a hit, c miss (evicts b), b miss (evicts a), b hit, a miss (evicts c)
    assert (stats.hits, stats.misses, stats.evictions) == (2, 5, 3)
    assert stats.cached == ["b", "a"]  # least recently used first
    assert stats.size == 2 and stats.max_size == 2
    assert stats.hit_rate == pytest.approx(2 / 7)
    assert owner.removed == [("b", "weights-b"), ("a", "weights-a"), ("c", "weights-c")]


def test_a_hit_makes_the_entry_most_recently_used(owner):
    cache = make_cache(owner, max_size=2)
    load(cache, "a")
    load(cache, "b")
    load(cache, "a")  # now b is the least recently used

    evicted = cache.put("c", "weights-c")

    assert evicted == ["b"]
    assert cache.keys() == ["a", "c"]


def test_peek_neither_counts_nor_reorders(owner):
    cache = make_cache(owner, max_size=2)
    load(cache, "a")
    load(cache, "b")

    assert cache.peek("a") == "weights-a"
    assert cache.peek("zzz") is None

    stats = cache.stats()
    assert (stats.hits, stats.misses) == (0, 2)
    assert stats.cached == ["a", "b"]


def test_clear_returns_the_count_is_not_an_eviction_and_counters_keep_counting(owner):
    cache = make_cache(owner, max_size=3)
    for key in ["a", "b", "a"]:
        load(cache, key)

    assert cache.clear() == 2
    assert cache.clear() == 0  # clearing twice is harmless
    load(cache, "a")

    stats = cache.stats()
    assert stats.evictions == 0
    assert (stats.hits, stats.misses) == (1, 3)
    assert stats.cached == ["a"]
    assert sorted(owner.removed) == [("a", "weights-a"), ("b", "weights-b")]


def test_remove_is_not_an_eviction_and_is_idempotent(owner):
    cache = make_cache(owner, max_size=2)
    load(cache, "a")

    assert cache.remove("a") is True
    assert cache.remove("a") is False

    stats = cache.stats()
    assert stats.evictions == 0 and stats.size == 0 and "a" not in cache
    assert owner.removed == [("a", "weights-a")]


def test_hit_rate_is_zero_when_nothing_was_looked_up(owner):
    stats = make_cache(owner).stats()

    assert stats.hit_rate == 0.0
    assert (stats.hits, stats.misses, stats.evictions, stats.size, stats.cached) == (0, 0, 0, 0, [])


def test_valid_predicate_drops_a_stale_entry_and_counts_a_miss(owner):
    cache = make_cache(owner, max_size=2)
    load(cache, "a")
    load(cache, "b")

    assert cache.lookup("a", valid=lambda value: value != "weights-a") is None
    assert cache.lookup("b", valid=lambda value: True) == "weights-b"

    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (1, 3, 0)
    assert stats.cached == ["b"]
    assert owner.removed == [("a", "weights-a")]


def test_replacing_a_key_hands_the_old_value_back_without_an_eviction(owner):
    cache = make_cache(owner, max_size=2)
    cache.put("a", "old")

    assert cache.put("a", "new") == []
    assert cache.put("a", "new") == []  # the same value again gives nothing back

    assert cache.peek("a") == "new"
    assert cache.stats().evictions == 0
    assert owner.removed == [("a", "old")]


def test_record_miss_counts_a_lookup_that_never_reached_the_cache(owner):
    cache = make_cache(owner)

    cache.record_miss()

    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.hit_rate) == (0, 1, 0.0)


def test_the_owner_may_call_back_into_the_cache_from_its_callback():
    # The callback runs outside the cache's lock, so an owner that asks the cache something does not deadlock.
    seen: list[list[str]] = []
    cache: LoraCache[str] = LoraCache(1, on_remove=lambda key, value: seen.append(cache.keys()))
    cache.put("a", "1")

    cache.put("b", "2")

    assert seen == [["b"]]


def test_size_below_one_is_refused():
    with pytest.raises(ValueError, match="max_size"):
        LoraCache(0, on_remove=lambda key, value: None)
