"""LoRA cache endpoints: stats and clear."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import LorasDep
from app.api.schemas import CacheClearPublic, CacheStatsPublic

router = APIRouter(prefix="/lora", tags=["lora"])


@router.get("/cache/stats", response_model=CacheStatsPublic)
def cache_stats(loras: LorasDep) -> CacheStatsPublic:
    return CacheStatsPublic(**loras.cache_stats().as_dict())


@router.post("/cache/clear", response_model=CacheClearPublic)
def cache_clear(loras: LorasDep) -> CacheClearPublic:
    return CacheClearPublic(cleared=loras.clear_cache())
