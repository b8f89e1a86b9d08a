"""GET /, /health, /ready."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app import SERVICE_NAME, __version__
from app.api.deps import StateDep

router = APIRouter(tags=["service"])


@router.get("/")
def service_info(state: StateDep) -> dict:
    s = state.settings
    engine = state.engine
    return {
        "service": SERVICE_NAME,
        "version": __version__,
        "model": s.model_id,
        "embedded_model": s.uses_embedded_model,
        "device": engine.device if engine else None,
        "dtype": str(engine.dtype).removeprefix("torch.") if engine else None,
        "ready": state.ready,
        "lora_dir": str(state.registry.root),
        "loras_found": state.registry.count(),
        "cache": {
            "enabled": s.lora_cache_enabled,
            "max_size": s.lora_cache_max_size,
            "preload_brands": s.preload_brands,
        },
        "docs": "/docs",
    }


@router.get("/health")
def health() -> dict:
    """The process is alive (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/ready")
def ready(state: StateDep):
    """200 once the model is loaded and preloading is done; 503 before (or if loading failed)."""
    if state.ready:
        return {"status": "ready", "preload": state.preload}
    body = {"status": "failed" if state.load_error else "loading"}
    if state.load_error:
        body["error"] = state.load_error
    return JSONResponse(status_code=503, content=body, headers={"Retry-After": "5"})
