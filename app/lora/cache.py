"""A plain, thread-safe LRU of resident adapters, with stats. It knows nothing of torch.

Removing an entry (eviction, invalidation, clear) calls back into the owner of the weights, outside
the cache's lock, so the owner may take its own locks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True)
class CacheStats:
    enabled: bool
    max_size: int
    size: int
    cached: list[str]  # least recently used first
    hits: int
    misses: int
    evictions: int
    hit_rate: float

    def as_dict(self) -> dict:
        return asdict(self)


class LoraCache(Generic[V]):
    def __init__(self, max_size: int, on_remove: Callable[[str, V], None], enabled: bool = True):
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self.enabled = enabled
        self._on_remove = on_remove
        self._entries: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = 0

    def lookup(self, key: str, valid: Callable[[V], bool] | None = None) -> V | None:
        """Return the entry (now most recently used) or None; counts one hit or one miss.

        An entry that `valid` rejects (its file changed on disk) is dropped and counts as a miss.
        """
        return self._get(key, valid, count=True)

    def peek(self, key: str, valid: Callable[[V], bool] | None = None) -> V | None:
        """Like lookup, without counting and without changing the LRU order."""
        return self._get(key, valid, count=False)

    def _get(self, key: str, valid: Callable[[V], bool] | None, count: bool) -> V | None:
        stale = None
        with self._lock:
            value = self._entries.get(key)
            if value is not None and valid is not None and not valid(value):
                stale, value = self._entries.pop(key), None
            if count:
                if value is None:
                    self._misses += 1
                else:
                    self._entries.move_to_end(key)
                    self._hits += 1
        if stale is not None:
            self._notify([(key, stale)])
        return value

    def record_miss(self) -> None:
        """Count a lookup that never reached the cache (e.g. the LoRA file does not exist)."""
        with self._lock:
            self._misses += 1

    def put(self, key: str, value: V) -> list[str]:
        """Insert or replace an entry; returns the keys evicted to make room."""
        removed: list[tuple[str, V]] = []
        evicted: list[str] = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None and old is not value:
                removed.append((key, old))
            self._entries[key] = value
            while len(self._entries) > self.max_size:
                victim, victim_value = self._entries.popitem(last=False)
                self._evictions += 1
                evicted.append(victim)
                removed.append((victim, victim_value))
        self._notify(removed)
        return evicted

    def remove(self, key: str) -> bool:
        """Drop one entry (invalidation, not an eviction). Harmless when absent."""
        with self._lock:
            value = self._entries.pop(key, None)
        if value is None:
            return False
        self._notify([(key, value)])
        return True

    def clear(self) -> int:
        """Drop every entry; counters keep counting and clearing is not an eviction."""
        with self._lock:
            removed = list(self._entries.items())
            self._entries.clear()
        self._notify(removed)
        return len(removed)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            looked_up = self._hits + self._misses
            return CacheStats(
                enabled=self.enabled,
                max_size=self.max_size,
                size=len(self._entries),
                cached=list(self._entries),
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                hit_rate=self._hits / looked_up if looked_up else 0.0,
            )

    def _notify(self, removed: list[tuple[str, V]]) -> None:
        for key, value in removed:
            self._on_remove(key, value)
