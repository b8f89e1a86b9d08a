"""Joins what is on disk (registry), what is known of each file (facts), what is resident (cache) and
the engine that reads LoRA files into device factors. No torch here: the engine does the reading.

`acquire` turns a request's LoRA list into adapters ready for a job, keyed by what the request named:
a cache hit reads no file; a miss passes the header gate, is read outside the generation lock, and is
cached. A file that changed on disk since it was cached is reloaded; one that failed to load fails
fast until it changes. Preloaded brands are pinned: never evicted, outside the LRU's capacity.

Two capacities, as in vLLM: `LORA_CACHE_MAX_SIZE` adapters on the device, and a host tier of up to
`LORA_HOST_CACHE_MB` where adapters evicted from the device stay converted (pinned host memory on
a GPU), so a re-miss costs a copy to the device instead of a file read and a conversion.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from app.errors import DuplicateLora, LoraUnavailable
from app.jobs import ActiveAdapter, AppliedLora, LoraSpec
from app.lora.cache import CacheStats, LoraCache
from app.lora.file_facts import LoraFileFacts
from app.lora.registry import DEFAULT_VERSION, LoraFile, LoraRegistry, UnsafeLoraPath

AVAILABLE_BRANDS_SHOWN = 10  # a message names at most this many brands that exist
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResidentLora:
    """A cache entry: the exact file, its factors on the device (None in the host tier) and in host
    memory (the same object on a CPU engine), and the file's sha256."""

    file: LoraFile
    weights: object | None
    host: object
    sha256: str


@dataclass(frozen=True)
class Resolution:
    """What one LoRA of a request became: an adapter with its applied record, or the warning why not."""

    adapter: ActiveAdapter | None = None
    applied: AppliedLora | None = None
    warning: str | None = None


@dataclass
class AcquiredLoras:
    """A request's LoRAs, keyed by what it named (brand, version); the files stay loaded while held."""

    specs: list[LoraSpec] = field(default_factory=list)
    resolved: dict[tuple[str, str | None], Resolution] = field(default_factory=dict)
    load_ms: float = 0.0  # reading files on cache misses, for the whole acquisition
    _load_ms_reported: bool = False

    def take_load_ms(self) -> float:
        """`load_ms` the first time (the first image reports it), 0 after."""
        reported, self._load_ms_reported = self._load_ms_reported, True
        return 0.0 if reported else self.load_ms

    def select(self, specs: Sequence[LoraSpec]) -> tuple[list[ActiveAdapter], list[AppliedLora], list[str]]:
        """The adapters, applied records and warnings for `specs` (a subset, at their own weights and labels).

        An A/B test acquires the union of its variants once and selects each variant from it.
        """
        adapters, applied, warnings = [], [], []
        for spec in specs:
            found = self.resolved[spec.ref]
            if found.adapter is None:
                warnings.append(found.warning)
                continue
            adapters.append(replace(found.adapter, weight=spec.weight))
            applied.append(replace(found.applied, weight=spec.weight, type=spec.type))
        return adapters, applied, warnings

    @property
    def adapters(self) -> list[ActiveAdapter]:
        return self.select(self.specs)[0]

    @property
    def applied(self) -> list[AppliedLora]:
        return self.select(self.specs)[1]

    @property
    def warnings(self) -> list[str]:
        return self.select(self.specs)[2]


class LoraManager:
    def __init__(
        self,
        registry: LoraRegistry,
        facts: LoraFileFacts,
        engine,
        cache_enabled: bool,
        cache_max_size: int,
        host_cache_bytes: int = 0,
    ):
        self.registry = registry
        self.facts = facts
        self.engine = engine
        self.cache: LoraCache[ResidentLora] = LoraCache(cache_max_size, enabled=cache_enabled)
        # Off with no budget, and with the cache off (each request then loads and drops its LoRAs).
        self.host: LoraCache[ResidentLora] | None = None
        if host_cache_bytes > 0 and cache_enabled:
            self.host = LoraCache(host_cache_bytes, weigh=lambda entry: entry.host.nbytes)
        self._key_locks: dict[str, threading.Lock] = {}
        self._key_locks_guard = threading.Lock()
        self.loads = 0
        self.load_seconds = 0.0

    # ---- the request path ----------------------------------------------------------------------

    def acquire(self, specs: Sequence[LoraSpec], strict: bool = False) -> AcquiredLoras:
        result = AcquiredLoras(specs=list(specs))
        files: set[str] = set()
        for spec in specs:
            lora_file = self.registry.resolve(spec.brand_id, spec.version)
            if lora_file is not None and lora_file.key in files:
                raise DuplicateLora(spec.brand_id, lora_file.version)  # e.g. the latest and that version by name
            result.resolved[spec.ref] = self._resolve(spec, lora_file, strict, result)
            if lora_file is not None:
                files.add(lora_file.key)
        return result

    def _resolve(self, spec: LoraSpec, lora_file: LoraFile | None, strict: bool, result: AcquiredLoras) -> Resolution:
        if lora_file is None:
            self.cache.record_miss()
            self._forget_deleted(spec)
            what = f"brand_id: {spec.brand_id}" + (f" (version {spec.version})" if spec.version else "")
            logger.warning("[LORA] LoRA not found for %s", what)
            reason = self._not_found_reason(spec)
            if strict:
                raise LoraUnavailable(spec.brand_id, f"{reason}; strict=true refuses to fall back to the base model")
            return Resolution(warning=f"LoRA not found for {what}; {reason}; generated with the base model")
        try:
            entry, load_ms = self._resident(lora_file, count=True)
        except LoraUnavailable as exc:
            if strict:
                raise
            return Resolution(warning=f"LoRA {spec.brand_id!r} was not applied ({exc.reason}); base model used instead")
        result.load_ms += load_ms
        applied = AppliedLora(
            brand_id=spec.brand_id,
            version=lora_file.version,
            weight=spec.weight,
            type=spec.type,
            file=str(lora_file.path.relative_to(self.registry.root)),
            sha256=entry.sha256,
        )
        return Resolution(ActiveAdapter(lora_file.key, entry.weights, spec.weight), applied)

    def _forget_deleted(self, spec: LoraSpec) -> None:
        """Drop cached entries of a LoRA whose file is gone, so its weights do not stay resident."""
        for key in self.cache.keys():
            brand_id, _, version = key.partition("@")
            if brand_id == spec.brand_id and spec.version in (None, version or DEFAULT_VERSION):
                self.remove(key)

    def _not_found_reason(self, spec: LoraSpec) -> str:
        """What is missing, and what exists instead (the request's brand's versions, or other brands)."""
        versions = self.registry.versions(spec.brand_id)
        if spec.version and versions:
            return f"brand {spec.brand_id!r} has no version {spec.version!r}; available versions: {', '.join(versions)}"
        if versions:  # the file went away between two looks
            return f"brand {spec.brand_id!r} has no LoRA file"
        available = self._brands_with_files(limit=AVAILABLE_BRANDS_SHOWN)
        shown = ", ".join(available[:AVAILABLE_BRANDS_SHOWN])
        shown += ", ..." if len(available) > AVAILABLE_BRANDS_SHOWN else ""
        return f"brand {spec.brand_id!r} has no LoRA file; available brands: {shown or 'none'}"

    def _brands_with_files(self, limit: int) -> list[str]:
        """Up to `limit` + 1 brand ids that have a LoRA file (one more tells the list was cut)."""
        found = []
        for brand_id in self.registry.brand_ids():
            try:
                if self.registry.versions(brand_id):
                    found.append(brand_id)
            except UnsafeLoraPath:
                continue
            if len(found) > limit:
                break
        return found

    def _resident(self, lora_file: LoraFile, count: bool) -> tuple[ResidentLora, float]:
        """The cached entry for this exact file, loading it on a miss. Returns (entry, ms spent loading)."""
        key = lora_file.key
        fresh = lambda entry: entry.file.fingerprint == lora_file.fingerprint  # noqa: E731
        if self.cache.enabled:
            entry = self.cache.lookup(key, valid=fresh) if count else self.cache.peek(key, valid=fresh)
            if entry is not None:
                return entry, 0.0
        elif count:
            self.cache.record_miss()
        with self._key_lock(key):
            # Another request may have loaded the same file while this one waited.
            entry = self.cache.peek(key, valid=fresh) if self.cache.enabled else None
            if entry is not None:
                return entry, 0.0
            start = time.perf_counter()
            entry = self._from_host_tier(lora_file, fresh) or self._load(lora_file)
            if self.cache.enabled:
                for evicted_key, evicted in self.cache.put(key, entry):
                    if self.host is not None:  # keep it converted in host memory; the device copy goes
                        self.host.put(evicted_key, replace(evicted, weights=None))
            return entry, (time.perf_counter() - start) * 1000

    def _from_host_tier(self, lora_file: LoraFile, fresh) -> ResidentLora | None:
        """An adapter evicted from the device earlier, copied back (no file read, no conversion)."""
        if self.host is None:
            return None
        entry = self.host.take(lora_file.key, valid=fresh)
        if entry is None:
            return None
        return replace(entry, weights=self.engine.to_device(entry.host))

    def _load(self, lora_file: LoraFile) -> ResidentLora:
        known = self.facts.invalid_reason(lora_file)
        if known is not None:
            raise LoraUnavailable(lora_file.brand_id, known)
        header, header_error = self.facts.header(lora_file)  # the gate: bad files never reach a loader
        if header_error is not None:
            logger.warning("[LORA] %s is invalid: %s", lora_file.path, header_error)
            raise LoraUnavailable(lora_file.brand_id, header_error)
        try:
            start = time.perf_counter()
            # Each version is hashed once (app/lora/file_facts.py): a known digest skips the hash.
            known = self.facts.known_sha256(lora_file)
            known_sha256 = None if known is None else (lora_file.fingerprint, known)
            host = self.engine.read_adapter(lora_file.path, header, known_sha256)
            self.facts.record_sha256(lora_file, host.fingerprint, host.sha256)
            weights = self.engine.to_device(host)
            self.load_seconds += time.perf_counter() - start
            self.loads += 1
        except Exception as exc:  # a broken upload must never take the service down
            reason = _describe(exc)
            self.facts.mark_invalid(lora_file, reason)
            logger.warning("[LORA] %s is invalid: %s", lora_file.path, reason)
            raise LoraUnavailable(lora_file.brand_id, reason) from exc
        logger.info("[LORA] loaded %s (%d layers)", lora_file.key, len(weights.layers))
        return ResidentLora(file=lora_file, weights=weights, host=host, sha256=weights.sha256)

    def _key_lock(self, key: str) -> threading.Lock:
        with self._key_locks_guard:
            return self._key_locks.setdefault(key, threading.Lock())

    # ---- operations ----------------------------------------------------------------------------

    def preload(self, brand_ids: Iterable[str]) -> dict[str, str | None]:
        """Load brands at start-up and pin them (no hits or misses). Returns brand -> error (None when loaded)."""
        outcome: dict[str, str | None] = {}
        for brand_id in brand_ids:
            try:
                lora_file = self.registry.resolve(brand_id)
                if lora_file is None:
                    raise LoraUnavailable(brand_id, "no LoRA file for this brand")
                self._resident(lora_file, count=False)
                self.cache.pin(lora_file.key)
                outcome[brand_id] = None
                logger.info("[LORA] preloaded and pinned %s", lora_file.key)
            except Exception as exc:
                outcome[brand_id] = _describe(exc)
                logger.warning("[LORA] preload of %r failed: %s", brand_id, outcome[brand_id])
        return outcome

    def remove(self, key: str) -> bool:
        """Forget an adapter in both tiers, pinned or not (its file was deleted or replaced)."""
        in_host = self.host is not None and self.host.remove(key)
        return self.cache.remove(key) or in_host

    def clear_cache(self) -> int:
        """Drop every unpinned adapter from both tiers and put the base weights back (the merged set held
        the last ones). Returns how many were dropped."""
        cleared = self.cache.clear() + (self.host.clear() if self.host is not None else 0)
        self.engine.restore_base()
        return cleared

    def host_stats(self) -> dict | None:
        if self.host is None:
            return None
        stats = self.host.stats()
        return {
            "max_mb": round(self.host.max_size / 2**20, 1),
            "used_mb": round(self.host.used() / 2**20, 1),
            "size": stats.size,
            "cached": stats.cached,
            "hits": stats.hits,
            "misses": stats.misses,
            "evictions": stats.evictions,
            "hit_rate": stats.hit_rate,
        }

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()

    def resident_adapters(self) -> list[str]:
        """Keys of the adapters held resident (what requests can use without reading a file)."""
        return self.cache.keys()

    def is_cached(self, lora_file: LoraFile) -> bool:
        entry = self.cache.peek(lora_file.key)
        return entry is not None and entry.file.fingerprint == lora_file.fingerprint


def _describe(exc: BaseException) -> str:
    if isinstance(exc, LoraUnavailable):
        return exc.reason
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
