"""Builds the FastAPI app: settings, LoRA registry, engine (loaded in the background), routes."""

from __future__ import annotations

import logging
import math
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from app import __version__
from app.api.routes import ab_test, generate, health, lora
from app.api.routes import metrics as metrics_routes
from app.api.security import AuthMiddleware
from app.config import Settings, load_settings
from app.engine.pipeline import GenerationOutOfMemory
from app.lora.catalog import LoraCatalog, LoraNotFound
from app.lora.manager import DuplicateLora, LoraUnavailable
from app.lora.registry import InvalidLoraId, LoraRegistry, UnsafeLoraPath
from app.observability import BodyLimitMiddleware, RequestContextMiddleware, RequestIdLogFilter, ServiceMetrics
from app.queueing import ClientGone, QueueFull, QueueTimeout
from app.service import InvalidRequest
from app.state import AppState

logger = logging.getLogger("app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    _configure_logging(settings.log_level)
    registry = LoraRegistry(settings.lora_base_dir)
    state = AppState(settings=settings, registry=registry, catalog=LoraCatalog(registry, settings.lora_max_file_mb))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry.ensure_root()
        state.start()
        yield
        state.stop()

    # Swagger UI and ReDoc from the assets the fastapi-offline package ships: /docs works with no network.
    app = FastAPIOffline(
        title="Brand image service",
        version=__version__,
        description="Stable Diffusion 1.5 image generation with per-brand LoRA adapters.",
        lifespan=lifespan,
    )
    app.state.service_state = state
    state.metrics = metrics = ServiceMetrics(state)
    # Added inside-out: the request context is outermost, so refusals get an id and are counted too.
    app.add_middleware(AuthMiddleware, settings=settings)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    app.include_router(health.router)
    app.include_router(metrics_routes.router)
    app.include_router(generate.router)
    app.include_router(lora.router)
    app.include_router(ab_test.router)
    _add_error_handlers(app)
    return app


def _configure_logging(level: str) -> None:
    """App logs carry the request id; configured once per process."""
    logger.setLevel(level.upper())
    if not any(isinstance(f, RequestIdLogFilter) for h in logger.handlers for f in h.filters):
        handler = logging.StreamHandler()
        handler.addFilter(RequestIdLogFilter())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _field_error(field: str, message: str, kind: str = "value_error") -> list[dict]:
    # The same shape FastAPI uses for schema errors, so clients parse one format.
    return [{"loc": ["body", field], "msg": message, "type": kind}]


def _safe_input(value):
    """The offending input, echoed only when it is a small JSON-safe scalar (never NaN or a huge string)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, str):
        return _printable(value if len(value) <= 100 else value[:100] + "...")
    return None


def _printable(text: str) -> str:
    """Text that encodes as UTF-8: a lone surrogate from the client must not break the error reply."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        detail = []
        for error in exc.errors():
            loc = [part if isinstance(part, int) else _printable(str(part)) for part in error.get("loc", ())]
            item = {"loc": loc, "msg": _printable(str(error.get("msg", ""))), "type": error.get("type", "")}
            if "input" in error and _safe_input(error["input"]) is not None:
                item["input"] = _safe_input(error["input"])
            detail.append(item)
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(InvalidRequest)
    async def invalid_request(_: Request, exc: InvalidRequest):
        return JSONResponse(status_code=422, content={"detail": _field_error(exc.field, str(exc))})

    @app.exception_handler(InvalidLoraId)
    async def invalid_id(_: Request, exc: InvalidLoraId):
        return JSONResponse(status_code=422, content={"detail": _field_error(exc.field, str(exc))})

    @app.exception_handler(UnsafeLoraPath)
    async def unsafe_path(_: Request, exc: UnsafeLoraPath):
        return JSONResponse(status_code=422, content={"detail": _field_error("brand_id", str(exc))})

    @app.exception_handler(LoraUnavailable)
    async def lora_unavailable(_: Request, exc: LoraUnavailable):
        return JSONResponse(status_code=422, content={"detail": _field_error("brand_id", str(exc), "lora_unavailable")})

    @app.exception_handler(DuplicateLora)
    async def duplicate_lora(_: Request, exc: DuplicateLora):
        return JSONResponse(status_code=422, content={"detail": _field_error("lora_configs", str(exc))})

    @app.exception_handler(LoraNotFound)
    async def lora_not_found(_: Request, exc: LoraNotFound):
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull):
        return JSONResponse(
            status_code=429,
            content={"detail": f"the service is busy: {exc}"},
            headers={"Retry-After": str(exc.retry_after_s)},
        )

    @app.exception_handler(QueueTimeout)
    async def queue_timeout(_: Request, exc: QueueTimeout):
        return JSONResponse(status_code=503, content={"detail": str(exc)}, headers={"Retry-After": "5"})

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, exc: ClientGone):
        return JSONResponse(status_code=499, content={"detail": "the client closed the connection"})

    @app.exception_handler(GenerationOutOfMemory)
    async def out_of_memory(_: Request, exc: GenerationOutOfMemory):
        return JSONResponse(
            status_code=503,
            content={"detail": f"the GPU ran out of memory for this request ({exc}); try a smaller size"},
            headers={"Retry-After": "5"},
        )


def run() -> None:
    """Console entry: serve on HOST:PORT from the settings."""
    import uvicorn

    settings = load_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


def __getattr__(name: str):
    # `uvicorn app.main:app` asks for `app`: it is built then, from the settings, not at import time,
    # so importing this module (tests, tools) reads no `.env` and cannot fail on a bad one.
    if name == "app":
        globals()["app"] = built = create_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(run())
