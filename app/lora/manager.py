"""Joins what is on disk (registry), what is resident (cache) and the engine that applies it.

`acquire` turns a request's LoRA list into adapters ready for the engine: a cache hit reads no file;
a miss checks the file's header, loads it outside the generation lock, and caches it. A file that
changed on disk since it was cached is reloaded; one that failed to load fails fast until it changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from app.engine.lora_weights import LoraWeights
from app.engine.pipeline import ActiveAdapter
from app.lora.cache import CacheStats, LoraCache
from app.lora.inspect import read_lora_header
from app.lora.registry import DEFAULT_VERSION, LoraFile, LoraRegistry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA a request asks for."""

    brand_id: str
    weight: float = 0.8
    version: str | None = None
    type: str | None = None


@dataclass(frozen=True)
class AppliedLora:
    brand_id: str
    version: str
    weight: float
    type: str | None
    file: str  # relative to the LoRA root
    sha256: str


@dataclass(frozen=True)
class ResidentLora:
    """A cache entry: the weights and the exact file they came from."""

    file: LoraFile
    weights: LoraWeights
    sha256: str


@dataclass
class AcquiredLoras:
    adapters: list[ActiveAdapter] = field(default_factory=list)
    applied: list[AppliedLora] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    load_ms: float = 0.0
    loaded_keys: list[str] = field(default_factory=list)  # loaded by this request (cache disabled: dropped after)


class LoraUnavailable(Exception):
    """A requested LoRA could not be applied and the request asked for strict handling."""

    def __init__(self, brand_id: str, reason: str):
        super().__init__(f"LoRA {brand_id!r} cannot be applied: {reason}")
        self.brand_id = brand_id
        self.reason = reason


class DuplicateLora(ValueError):
    """Two entries of one request resolve to the same file (e.g. a brand's latest and that version by name)."""

    def __init__(self, brand_id: str, version: str):
        super().__init__(f"LoRA {brand_id!r} version {version!r} is listed twice; give each LoRA once")
        self.brand_id, self.version = brand_id, version


class LoraManager:
    def __init__(self, registry: LoraRegistry, engine, cache_enabled: bool, cache_max_size: int, max_file_mb: int):
        self.registry = registry
        self.engine = engine
        self.cache: LoraCache[ResidentLora] = LoraCache(
            cache_max_size, on_remove=lambda key, _entry: engine.remove_adapter(key), enabled=cache_enabled
        )
        self.max_file_bytes = max_file_mb * 1024 * 1024
        self._invalid: dict[str, tuple[tuple[int, int, int], str]] = {}  # key -> (fingerprint, reason)
        self._key_locks: dict[str, threading.Lock] = {}
        self._key_locks_guard = threading.Lock()
        self.loads = 0
        self.load_seconds = 0.0

    # ---- the request path ----------------------------------------------------------------------

    def acquire(self, specs: Sequence[LoraSpec], strict: bool = False) -> AcquiredLoras:
        result = AcquiredLoras()
        seen: set[str] = set()
        for spec in specs:
            lora_file = self.registry.resolve(spec.brand_id, spec.version)
            if lora_file is not None:
                if lora_file.key in seen:
                    raise DuplicateLora(spec.brand_id, lora_file.version)
                seen.add(lora_file.key)
            if lora_file is None:
                self.cache.record_miss()
                self._forget_deleted(spec)
                what = f"brand_id: {spec.brand_id}" + (f" (version {spec.version})" if spec.version else "")
                logger.warning("[LORA] LoRA not found for %s", what)
                if strict:
                    raise LoraUnavailable(spec.brand_id, self._not_found_reason(spec))
                result.warnings.append(f"LoRA not found for {what}; {self._not_found_reason(spec)}")
                continue
            try:
                entry, load_ms = self._resident(lora_file, count=True)
            except LoraUnavailable as exc:
                if strict:
                    raise
                result.warnings.append(
                    f"LoRA {spec.brand_id!r} was not applied ({exc.reason}); base model used instead"
                )
                continue
            if load_ms:
                result.load_ms += load_ms
                result.loaded_keys.append(lora_file.key)
            result.adapters.append(ActiveAdapter(lora_file.key, entry.weights, spec.weight))
            result.applied.append(
                AppliedLora(
                    brand_id=spec.brand_id,
                    version=lora_file.version,
                    weight=spec.weight,
                    type=spec.type,
                    file=str(lora_file.path.relative_to(self.registry.root)),
                    sha256=entry.sha256,
                )
            )
        return result

    def release(self, acquired: AcquiredLoras) -> None:
        """With the cache disabled, adapters loaded for one request are dropped after it."""
        if not self.cache.enabled:
            for key in acquired.loaded_keys:
                self.engine.remove_adapter(key)

    def _forget_deleted(self, spec: LoraSpec) -> None:
        """Drop cached entries of a LoRA whose file is gone, so its weights do not stay resident."""
        for key in self.cache.keys():
            brand_id, _, version = key.partition("@")
            if brand_id == spec.brand_id and spec.version in (None, version or DEFAULT_VERSION):
                self.cache.remove(key)

    def _not_found_reason(self, spec: LoraSpec) -> str:
        versions = self.registry.versions(spec.brand_id)
        if spec.version and versions:
            return f"available versions: {', '.join(versions)}; generated with the base model"
        return "generated with the base model"

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
            entry = self._load(lora_file)
            elapsed = time.perf_counter() - start
            if self.cache.enabled:
                self.cache.put(key, entry)
            return entry, elapsed * 1000

    def _load(self, lora_file: LoraFile) -> ResidentLora:
        key = lora_file.key
        known = self._invalid.get(key)
        if known is not None and known[0] == lora_file.fingerprint:
            raise LoraUnavailable(lora_file.brand_id, known[1])
        try:
            read_lora_header(lora_file.path, self.max_file_bytes)  # refuse bad files before any loader sees them
            start = time.perf_counter()
            weights = self.engine.load_adapter(key, lora_file.path)
            self.load_seconds += time.perf_counter() - start
            self.loads += 1
        except Exception as exc:  # a broken upload must never take the service down
            reason = _describe(exc)
            self._invalid[key] = (lora_file.fingerprint, reason)
            logger.warning("[LORA] %s is invalid: %s", lora_file.path, reason)
            raise LoraUnavailable(lora_file.brand_id, reason) from exc
        self._invalid.pop(key, None)
        logger.info("[LORA] loaded %s (%d layers)", key, len(weights.layers))
        return ResidentLora(file=lora_file, weights=weights, sha256=self.registry.sha256(lora_file))

    def _key_lock(self, key: str) -> threading.Lock:
        with self._key_locks_guard:
            return self._key_locks.setdefault(key, threading.Lock())

    # ---- operations ----------------------------------------------------------------------------

    def preload(self, brand_ids: Iterable[str]) -> dict[str, str | None]:
        """Load brands at start-up (no hits or misses). Returns brand -> error (None when loaded)."""
        outcome: dict[str, str | None] = {}
        for brand_id in brand_ids:
            try:
                lora_file = self.registry.resolve(brand_id)
                if lora_file is None:
                    raise LoraUnavailable(brand_id, "no LoRA file for this brand")
                self._resident(lora_file, count=False)
                outcome[brand_id] = None
                logger.info("[LORA] preloaded %s", lora_file.key)
            except Exception as exc:
                outcome[brand_id] = _describe(exc)
                logger.warning("[LORA] preload of %r failed: %s", brand_id, outcome[brand_id])
        return outcome

    def invalid_reason(self, lora_file: LoraFile) -> str | None:
        """Why this exact file failed to load, if it did (None when it loaded or was never tried)."""
        known = self._invalid.get(lora_file.key)
        return known[1] if known is not None and known[0] == lora_file.fingerprint else None

    def invalid_count(self) -> int:
        return len(self._invalid)

    def clear_cache(self) -> int:
        cleared = self.cache.clear()
        self.engine.restore_base()
        return cleared

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()

    def is_cached(self, lora_file: LoraFile) -> bool:
        entry = self.cache.peek(lora_file.key)
        return entry is not None and entry.file.fingerprint == lora_file.fingerprint


def _describe(exc: BaseException) -> str:
    if isinstance(exc, LoraUnavailable):
        return exc.reason
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
