"""A plain, thread-safe LRU of resident adapters, with stats. It knows nothing of torch.

Pinned entries (the preloaded brands) are never evicted or cleared and do not count against
`max_size`: the LRU's capacity is for the adapters traffic brings in. A removed entry's weights are
freed when the last job holding them finishes.
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
    max_size: int  # in the cache's units: entries, or bytes for the host tier
    size: int  # every resident entry, pinned included
    cached: list[str]  # least recently used first
    pinned: list[str]  # never evicted, not counted against max_size
    hits: int
    misses: int
    evictions: int
    hit_rate: float

    def as_dict(self) -> dict:
        return asdict(self)


class LoraCache(Generic[V]):
    def __init__(self, max_size: int, enabled: bool = True, weigh: Callable[[V], int] | None = None):
        """`weigh(value)` is what an entry counts against `max_size` (default: 1, i.e. entries)."""
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self.enabled = enabled
        self._weigh = weigh or (lambda _value: 1)
        self._entries: OrderedDict[str, V] = OrderedDict()
        self._pinned: set[str] = set()
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
        with self._lock:
            value = self._entries.get(key)
            if value is not None and valid is not None and not valid(value):
                self._entries.pop(key)  # the file changed: the new one is loaded (and stays pinned if it was)
                value = None
            if count:
                if value is None:
                    self._misses += 1
                else:
                    self._entries.move_to_end(key)
                    self._hits += 1
        return value

    def record_miss(self) -> None:
        """Count a lookup that never reached the cache (e.g. the LoRA file does not exist)."""
        with self._lock:
            self._misses += 1

    def put(self, key: str, value: V) -> list[tuple[str, V]]:
        """Insert or replace an entry; returns the (key, value) pairs evicted to make room, least recently
        used first, never pinned ones (the caller may keep them elsewhere)."""
        evicted: list[tuple[str, V]] = []
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = value
            unpinned = [k for k in self._entries if k not in self._pinned]
            load = sum(self._weigh(self._entries[k]) for k in unpinned)
            for victim in unpinned:
                if load <= self.max_size:
                    break
                value_out = self._entries.pop(victim)
                load -= self._weigh(value_out)
                self._evictions += 1
                evicted.append((victim, value_out))
        return evicted

    def take(self, key: str, valid: Callable[[V], bool] | None = None) -> V | None:
        """Look up (counting a hit or a miss) and remove: an entry moving to another tier."""
        value = self.lookup(key, valid)
        if value is not None:
            self.remove(key)
        return value

    def used(self) -> int:
        """What the entries count against `max_size`, pinned ones included."""
        with self._lock:
            return sum(self._weigh(v) for v in self._entries.values())

    def pin(self, key: str) -> bool:
        """Keep an entry resident for good (it stops counting against max_size). False when absent."""
        with self._lock:
            if key not in self._entries:
                return False
            self._pinned.add(key)
            return True

    def remove(self, key: str) -> bool:
        """Drop one entry, pinned or not (its file is gone or was replaced). Harmless when absent."""
        with self._lock:
            self._pinned.discard(key)
            return self._entries.pop(key, None) is not None

    def clear(self) -> int:
        """Drop every unpinned entry; counters keep counting and clearing is not an eviction."""
        with self._lock:
            cleared = [k for k in self._entries if k not in self._pinned]
            for key in cleared:
                del self._entries[key]
        return len(cleared)

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
                pinned=sorted(self._pinned & self._entries.keys()),
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                hit_rate=self._hits / looked_up if looked_up else 0.0,
            )
