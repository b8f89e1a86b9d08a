"""Builds the FastAPI app: settings, LoRA registry, engine (loaded in the background), routes.

Nothing here imports torch: the engine is imported when the model loads, so the HTTP layer can be
imported, tested and run as an ingress without a model.
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from app import __version__
from app.access import KeyRing, KeysFileError
from app.api.errors import add_error_handlers, error_body
from app.api.routes import a1111, ab, generate, health, jobs, lora, lora_versions, openai_images, train
from app.api.routes import metrics as metrics_routes
from app.api.schemas import show_configured_maxima
from app.api.security import AuthMiddleware, authorize
from app.config import Settings, load_settings
from app.jobqueue.runner import JobRunner
from app.observability import BodyLimitMiddleware, RequestContextMiddleware, ServiceMetrics, configure_logging
from app.state import AppState, install_sighup_reload, install_sigterm_drain


def create_app(settings: Settings | None = None, state: AppState | None = None) -> FastAPI:
    """The app; `state` replaces the one built from the settings (the Ray ingress passes its own,
    whose service and LoRA manager are the replicas: app/serve/)."""
    settings = settings or load_settings()
    configure_logging(settings.log_level, settings.log_format)
    state = state or AppState.for_settings(settings)
    keys = key_ring(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.registry.ensure_root()
        state.start()
        keys.start()
        state.jobs = job_runner(state)
        state.jobs.start()
        restore_signal = install_sigterm_drain(state)
        restore_hup = install_sighup_reload(keys.reload)
        try:
            yield
        finally:
            restore_hup()
            restore_signal()
            await state.jobs.stop()
            keys.stop()
            state.stop()

    # Swagger UI and ReDoc from the assets the fastapi-offline package ships: /docs works with no network.
    app = FastAPIOffline(
        title="Brand image service",
        version=__version__,
        description="Stable Diffusion 1.5 image generation with per-brand LoRA adapters.",
        lifespan=lifespan,
        dependencies=[Depends(authorize)],  # every route's role and path brand (app/api/security.py)
    )
    app.state.service_state = state
    app.state.keys = keys
    state.metrics = metrics = ServiceMetrics(state)
    # Added inside-out: the request context is outermost, so refusals get an id, a log line and a count.
    app.add_middleware(AuthMiddleware, keys=keys)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, max_image_bytes=settings.max_image_body_bytes
    )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    routers = (health, metrics_routes, generate, jobs, openai_images, a1111, lora, lora_versions, train, ab)
    for router in (module.router for module in routers):
        app.include_router(router)
    add_error_handlers(app)
    show_configured_maxima(app, settings)
    return app


def key_ring(settings: Settings) -> KeyRing:
    """API_KEYS_FILE and the legacy keys; a file that fails here stops the service like any bad setting."""
    secret = lambda value: value.get_secret_value() if value is not None else None  # noqa: E731
    try:
        return KeyRing(settings.api_keys_file, secret(settings.api_key), secret(settings.admin_api_key))
    except KeysFileError as exc:
        raise SystemExit(f"Invalid configuration: {exc}") from None


def job_runner(state: AppState) -> JobRunner:
    """The jobs' store and runner: jobs go through the app's GenerationService once it is loaded; a job's
    `result` is /generate's reply (without the image, a file) and its `error` is /generate's answer."""
    s = state.settings
    secret = s.webhook_secret.get_secret_value() if s.webhook_secret is not None else None
    return JobRunner(
        s.data_dir,
        service=lambda: state.service if state.ready else None,
        accepting=lambda: not state.draining,
        to_result=lambda outcome: generate.generate_response(outcome).model_dump(exclude={"image"}),
        to_error=error_body,
        max_inflight=s.batch_max_size,
        preview_every=s.preview_every,
        ttl_s=s.job_ttl_s,
        webhook_secret=secret,
        webhook_backoff_s=s.webhook_retry_backoff_s,
        on_status=None if state.metrics is None else state.metrics.count_job,
    )


def run() -> None:
    """Console entry: serve on HOST:PORT from the settings (our access log replaces uvicorn's)."""
    import uvicorn

    settings = load_settings()
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False
    )


def __getattr__(name: str):
    # `uvicorn app.main:app` asks for `app`: it is built then, from the settings, not at import time,
    # so importing this module (tests, tools) reads no `.env` and cannot fail on a bad one.
    if name == "app":
        globals()["app"] = built = create_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(run())
