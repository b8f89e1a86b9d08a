"""LoRA endpoints: list, metadata, cache stats and clear."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from app.api.deps import AbStoreDep, CallerDep, CatalogDep, LorasDep, StateDep
from app.api.schemas import CacheClearPublic, CacheStatsPublic, LoraListPublic, LoraMetadataPublic
from app.lora.registry import ID_PATTERN
from app.observability import audit

router = APIRouter(prefix="/lora", tags=["lora"])

BrandPath = Annotated[str, Path(pattern=ID_PATTERN.pattern, description="the brand's folder name")]


@router.get("/list", response_model=LoraListPublic)
def list_loras(
    catalog: CatalogDep,
    state: StateDep,
    caller: CallerDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> LoraListPublic:
    """One entry per brand of the key, sorted by id; `count` is their total, `offset`/`limit` page through it."""
    data, total = catalog.list(state.loras, offset, limit, visible=caller.may_use)
    return LoraListPublic(data=data, count=total, offset=offset, limit=limit)


@router.get("/cache/stats", response_model=CacheStatsPublic)
def cache_stats(loras: LorasDep, caller: CallerDep) -> CacheStatsPublic:
    """The counters; for a key that is not admin, `cached` and `pinned` list only its brands."""
    stats, host = loras.cache_stats().as_dict(), loras.host_stats()
    if not caller.is_admin:
        stats = _own_entries(stats, caller)
        host = _own_entries(host, caller) if host is not None else None
    return CacheStatsPublic(**stats, host=host)


def _own_entries(stats: dict, caller) -> dict:
    """`cached` / `pinned` (cache keys `brand` or `brand@version`) kept to the caller's brands, also per replica."""
    mine = lambda keys: [k for k in keys if caller.may_use(k.split("@", 1)[0])]  # noqa: E731
    out = {**stats, **{name: mine(stats[name]) for name in ("cached", "pinned") if name in stats}}
    if isinstance(stats.get("replicas"), dict):
        out["replicas"] = {rid: _own_entries(r, caller) for rid, r in stats["replicas"].items()}
    return out


@router.post("/cache/clear", response_model=CacheClearPublic)
def cache_clear(loras: LorasDep) -> CacheClearPublic:
    cleared = loras.clear_cache()
    audit("cache-clear", cleared=cleared)
    return CacheClearPublic(cleared=cleared)


@router.get("/{brand_id}/metadata", response_model=LoraMetadataPublic)
def lora_metadata(
    brand_id: BrandPath,
    catalog: CatalogDep,
    state: StateDep,
    ab_store: AbStoreDep,
    version: Annotated[str | None, Query(pattern=ID_PATTERN.pattern)] = None,
) -> LoraMetadataPublic:
    """metadata.json beside the file, facts read from the safetensors header (no tensors loaded), and
    the weight chosen in the brand's latest A/B test."""
    described = catalog.describe(brand_id, version, state.loras)
    return LoraMetadataPublic(**described, recommended_weight=ab_store.recommended_weight(brand_id))
