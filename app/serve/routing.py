"""Which replica a request should go to: pure Python (no Ray, no torch), so it is tested on its own
and shared by the Ray deployment and the planning simulation (`python -m bench.routing_sim`).

- `lora_set_key`: the canonical key of a request's LoRA set (sorted `brand@version`, no weights),
  resolved through the registry exactly as the replica's LoRA manager will resolve it, so
  `acme` and `acme@v2` (when v2 is the latest) are one set. It is Ray's multiplexed model id.
- `AffinityPlanner`: a set's slot (which replica should hold it: traffic-balanced, sticky) and its
  routing key; a set that one replica cannot carry (well above 1/replicas of the recent requests)
  gets copies `key#1`, `key#2`, ... chosen round-robin, in other slots, so several replicas hold it
  (Ray keeps one model on one replica otherwise: ray-project/ray#48741, #65691).
- `slot_replica`: slot -> replica id (the sorted live replicas, slot mod their number).
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from collections.abc import Iterable, Sequence

from app.jobs import LoraSpec
from app.lora.registry import LoraRegistry

COPY_SEPARATOR = "#"
# A set's requests in the window before its share can make it hot: a share of a few requests is noise.
HOT_MIN_REQUESTS = 10


def lora_set_key(registry: LoraRegistry, specs: Sequence[LoraSpec]) -> str:
    """Sorted cache keys of the files the request's LoRAs resolve to; weight-0 and missing LoRAs are
    left out (they change nothing in the weights). "" = the base model (any replica)."""
    keys = set()
    for spec in specs:
        if spec.weight == 0.0:
            continue
        lora_file = registry.resolve(spec.brand_id, spec.version)
        if lora_file is not None:
            keys.add(lora_file.key)
    return "+".join(sorted(keys))


def base_key(model_id: str) -> str:
    """`acme#2` -> `acme`: the set a routing copy stands for."""
    return model_id.split(COPY_SEPARATOR, 1)[0]


def copy_index(model_id: str) -> int:
    _, sep, k = model_id.partition(COPY_SEPARATOR)
    return int(k) if sep and k.isdigit() else 0


def slot_replica(slot: int, replica_ids: Iterable[str]) -> str | None:
    """The replica of a slot: the live replicas in a fixed (sorted) order, slot modulo their number."""
    ordered = sorted(replica_ids)
    return ordered[slot % len(ordered)] if ordered else None


class AffinityPlanner:
    """Where a LoRA set should live: a slot (0..replicas-1, mapped to a replica by the router) and the
    routing key, the set's key or, for a hot set, one of its copies `key#k`.

    - Placement: a set first seen (or seen again after it left the window) takes the slot whose sets
      carry the least recent traffic, so popular sets spread over the replicas and each replica's
      cache serves its share; the set keeps that slot while it stays in the window. (Placing by a hash
      of the key gives the same hit rate on average, but a bad split of the top sets costs up to 30%.)
    - Copies only for a set that one replica cannot carry. Over the last `window` requests, a set
      becomes hot when it has at least HOT_MIN_REQUESTS requests there and its share is above
      (1 + `hot_margin`) / replicas, one replica's part of the work plus a margin; it stays hot until
      its share falls to 1 / replicas or below (hysteresis: a set near the line does not flap). A
      hot set gets `min(replicas, ceil(share * replicas))` copies (at least 2), used round-robin;
      copy k lives in slot (home + k) mod replicas. Copy 0 is the plain key, so a set that cools
      down goes back to the replica that held it first. A set below one replica's share never gets
      a copy: placement already balances such sets, and a copy would evict another set's adapter.
    """

    def __init__(self, replicas: int, window: int, hot_margin: float = 0.25):
        self.replicas = max(1, replicas)
        self.hot_margin = hot_margin
        self.window = window
        self._recent: deque[str] = deque()
        self._counts: Counter[str] = Counter()
        self._slots: dict[str, int] = {}
        self._turn: Counter[str] = Counter()
        self._hot: set[str] = set()
        self._lock = threading.Lock()

    def copies(self, key: str) -> int:
        with self._lock:
            return self._copies(key, self._is_hot(key))

    def _is_hot(self, key: str) -> bool:
        """Hot now, from the set's share and whether it was hot before (the hysteresis)."""
        if self.replicas < 2 or not self._recent:
            return False
        count = self._counts[key]
        share = count / len(self._recent)
        one_replica = 1 / self.replicas
        if key in self._hot:
            return share > one_replica
        return count >= HOT_MIN_REQUESTS and share > one_replica * (1 + self.hot_margin)

    def _copies(self, key: str, hot: bool) -> int:
        if not hot:
            return 1
        share = self._counts[key] / len(self._recent)
        return max(2, min(self.replicas, math.ceil(share * self.replicas)))

    def _slot(self, key: str) -> int:
        slot = self._slots.get(key)
        if slot is None:
            mass = [0] * self.replicas
            sets = [0] * self.replicas
            for other, other_slot in self._slots.items():
                mass[other_slot] += self._counts[other]
                sets[other_slot] += 1
            slot = self._slots[key] = min(range(self.replicas), key=lambda i: (mass[i], sets[i], i))
        return slot

    def route(self, key: str) -> tuple[str, int | None]:
        """Record one request for `key`; returns (routing key, slot). ("", None): the base model, anywhere."""
        if not key:
            return key, None
        with self._lock:
            self._recent.append(key)
            self._counts[key] += 1
            if len(self._recent) > self.window:
                old = self._recent.popleft()
                self._counts[old] -= 1
                if not self._counts[old]:
                    del self._counts[old]
                    self._slots.pop(old, None)
                    self._turn.pop(old, None)
                    self._hot.discard(old)
            home = self._slot(key)
            hot = self._is_hot(key)
            if hot:
                self._hot.add(key)
            else:
                self._hot.discard(key)
            n = self._copies(key, hot)
            k = self._turn[key] % n if n > 1 else 0
            self._turn[key] += 1
            return (key if k == 0 else f"{key}{COPY_SEPARATOR}{k}"), (home + k) % self.replicas

    def hot_keys(self) -> dict[str, int]:
        """Sets served by more than one replica now, with their number of copies."""
        with self._lock:
            return {key: n for key in self._counts if (n := self._copies(key, self._is_hot(key))) > 1}
