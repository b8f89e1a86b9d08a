"""GET /, /health, /ready."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app import SERVICE_NAME, __version__
from app.api.deps import CallerDep, StateDep
from app.samplers import SCHEDULER_NAMES

router = APIRouter(tags=["service"])


@router.get("/")
def service_info(state: StateDep, caller: CallerDep) -> dict:
    s = state.settings
    engine = state.engine
    return {
        "service": SERVICE_NAME,
        "version": __version__,
        "model": s.model_id,
        "embedded_model": s.uses_embedded_model,
        "device": engine.device if engine else None,
        "dtype": str(engine.dtype).removeprefix("torch.") if engine else None,
        "compile": engine.compile_stats() if engine else None,
        "ready": state.ready,
        "lora_dir": str(state.registry.root),
        "loras_found": state.registry.count()
        if caller.is_admin
        else sum(1 for b in state.registry.brand_ids() if caller.may_use(b)),  # a key counts only its own brands
        "cache": {
            "enabled": s.lora_cache_enabled,
            "max_size": s.lora_cache_max_size,
            "preload_brands": s.preload_brands,
        },
        "schedulers": list(SCHEDULER_NAMES),
        "docs": "/docs",
    }


@router.get("/health")
def health() -> dict:
    """The process is alive (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/ready")
def ready(state: StateDep):
    """200 when the service takes traffic: the model is loaded, preloading is done, it is not draining
    for shutdown and the generation worker is making progress. 503 otherwise, with the reason."""
    reason = state.not_ready_reason()
    if reason is None:
        return {"status": "ready", "preload": state.preload}
    status, why = reason
    body = {"status": status}
    if status == "failed":
        body["error"] = state.load_error
    elif status != "loading":
        body["detail"] = why
    return JSONResponse(status_code=503, content=body, headers={"Retry-After": "5"})
