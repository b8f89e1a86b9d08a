"""LoRA endpoints: list, metadata, cache stats and clear."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from app.api.deps import AbStoreDep, CatalogDep, LorasDep, StateDep
from app.api.schemas import CacheClearPublic, CacheStatsPublic, LoraListPublic, LoraMetadataPublic
from app.lora.registry import ID_PATTERN

router = APIRouter(prefix="/lora", tags=["lora"])

BrandPath = Annotated[str, Path(pattern=ID_PATTERN.pattern, description="the brand's folder name")]


@router.get("/list", response_model=LoraListPublic)
def list_loras(
    catalog: CatalogDep,
    state: StateDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> LoraListPublic:
    """One entry per brand, sorted by id; `count` is the total, `offset`/`limit` page through it."""
    data, total = catalog.list(state.loras, offset, limit)
    return LoraListPublic(data=data, count=total, offset=offset, limit=limit)


@router.get("/cache/stats", response_model=CacheStatsPublic)
def cache_stats(loras: LorasDep) -> CacheStatsPublic:
    return CacheStatsPublic(**loras.cache_stats().as_dict(), host=loras.host_stats())


@router.post("/cache/clear", response_model=CacheClearPublic)
def cache_clear(loras: LorasDep) -> CacheClearPublic:
    return CacheClearPublic(cleared=loras.clear_cache())


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
