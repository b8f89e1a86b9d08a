"""Request ids in logs and responses, one access log line per request, the request body limit, and
Prometheus metrics.

Metrics live in a registry per app (tests build many apps). Cache, queue and LoRA numbers are read
from their owners when /metrics is scraped, so those owners need no metrics code.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from datetime import UTC, datetime

from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.access import current_caller
from app.lora.uploads import is_upload

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# What the request path reports for the access line: brands applied and per-image timings.
request_images_var: contextvars.ContextVar[list | None] = contextvars.ContextVar("request_images", default=None)
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
access_logger = logging.getLogger("app.access")
audit_logger = logging.getLogger("app.audit")


def record_image(brands: list[str], queue_ms: float, lora_ms: float, generation_ms: float) -> None:
    """Note one generated image for this request's access line (an A/B test notes several)."""
    images = request_images_var.get()
    if images is not None:
        images.append((brands, queue_ms, lora_ms, generation_ms))


def audit(
    action: str,
    brand_id: str = "-",
    version: str | None = None,
    sha256: str | None = None,
    key: str | None = None,
    **more,
) -> None:
    """One audit line (uploads, deletes, trainings, cache clears): the key's name, brand, version, sha256."""
    if key is None:
        caller = current_caller.get()
        key = caller.name if caller is not None else "-"
    fields = {"action": action, "key": key, "brand": brand_id,
              "version": version or "-", "sha256": sha256 or "-", **more}  # fmt: skip
    audit_logger.warning("audit %s", " ".join(f"{k}={v}" for k, v in fields.items()), extra={"fields": fields})


class RequestIdLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line (LOG_FORMAT=json): time, level, logger, request_id, message, and the
    access line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str = "text") -> None:
    """App logs carry the request id; configured once per process (the format of the last app wins)."""
    logger = logging.getLogger("app")
    logger.setLevel(level.upper())
    handler = next((h for h in logger.handlers if any(isinstance(f, RequestIdLogFilter) for f in h.filters)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.addFilter(RequestIdLogFilter())
        logger.addHandler(handler)
        logger.propagate = False
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))


class ServiceMetrics:
    def __init__(self, state):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests", "HTTP requests by endpoint and status", ["method", "endpoint", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "http_request_duration_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generation_seconds = Histogram(
            "generation_duration_seconds", "Time in the diffusion pipeline per image", buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generation_batch_size = Histogram(
            "generation_batch_size", "Images per denoising loop", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=self.registry,
        )
        # Per key (its `name` from API_KEYS_FILE; API_KEY / ADMIN_API_KEY for the legacy keys).
        self.key_requests = Counter("api_key_requests", "Requests answered, by key", ["key"], registry=self.registry)
        self.key_images = Counter("api_key_images", "Images generated, by key", ["key"], registry=self.registry)
        self.key_requests_limited = Counter(
            "api_key_requests_limited", "Requests refused with 429 for the key's requests_per_minute", ["key"],
            registry=self.registry,
        )
        self.jobs = Counter("jobs", "Jobs that entered each status (POST /jobs)", ["status"], registry=self.registry)
        self.state_collector = _StateCollector(state)
        self.registry.register(self.state_collector)
        # Jobs live where the HTTP API runs (under Ray Serve, the ingress, whose state collector is replaced).
        self.registry.register(_JobsCollector(state))


    def count_job(self, status: str) -> None:
        self.jobs.labels(status=status).inc()


class _JobsCollector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        if self.state.jobs is not None:
            pending = GaugeMetricFamily("jobs_pending", "Jobs queued or running (JOBS_MAX_PENDING bounds them)")
            pending.add_metric([], self.state.jobs.pending())
            yield pending


class _StateCollector:
    """Reads queue, cache and LoRA numbers from the running app at scrape time."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        state = self.state
        depth = GaugeMetricFamily("generation_queue_depth", "Generations waiting or running")
        depth.add_metric([], state.queue.depth if state.queue is not None else 0)
        yield depth
        manager = state.loras
        if manager is None:
            return
        stats = manager.cache_stats()
        for name, value, doc in (
            ("lora_cache_hits", stats.hits, "LoRA lookups served from the resident cache"),
            ("lora_cache_misses", stats.misses, "LoRA lookups that were not in the cache"),
            ("lora_cache_evictions", stats.evictions, "Adapters evicted to make room"),
            ("lora_loads", manager.loads, "LoRA files loaded"),
            ("lora_load_seconds", manager.load_seconds, "Seconds spent loading LoRA files"),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], value)
            yield counter
        host = manager.host_stats()
        if host is not None:
            for name, value, doc in (
                ("lora_host_cache_hits", host["hits"], "LoRA misses on the device served from the host tier"),
                ("lora_host_cache_misses", host["misses"], "LoRA misses on the device not in the host tier"),
                ("lora_host_cache_evictions", host["evictions"], "Adapters dropped from the host tier"),
            ):
                counter = CounterMetricFamily(name, doc)
                counter.add_metric([], value)
                yield counter
            for name, value, doc in (
                ("lora_host_cache_bytes", host["used_mb"] * 2**20, "Host memory held by the host tier"),
                ("lora_host_cache_adapters", host["size"], "Adapters in the host tier"),
            ):
                gauge = GaugeMetricFamily(name, doc)
                gauge.add_metric([], value)
                yield gauge
        for name, value, doc in (
            ("lora_resident_adapters", len(manager.resident_adapters()), "Adapters resident on the device"),
            ("lora_cache_size", stats.size, "Entries in the LoRA cache"),
            ("lora_pinned_adapters", len(stats.pinned), "Preloaded adapters pinned in the cache"),
            ("lora_invalid_files", state.facts.invalid_count(), "LoRA files refused as invalid"),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge


class RequestContextMiddleware:
    """Gives each request an id (X-Request-ID in, or a new one), counts it, times it, and logs one access
    line: method, path, status, ms, and for generations the brands applied and queue/LoRA/generation ms."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        request_id = given if given and REQUEST_ID_PATTERN.fullmatch(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        images_token = request_images_var.set(images := [])
        status = [500]
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], endpoint, str(status[0])).inc()
            self.metrics.request_seconds.labels(endpoint).observe(elapsed)
            caller = scope.get("app.caller")
            key = caller.name if caller is not None else "-"
            if caller is not None and not caller.anonymous:
                if scope.get("app.limited") or scope.get("app.quota", {}).get("limited"):
                    self.metrics.key_requests_limited.labels(key).inc()
                else:
                    self.metrics.key_requests.labels(key).inc()
                if images:
                    self.metrics.key_images.labels(key).inc(len(images))
            _log_access(scope["method"], scope["path"], status[0], elapsed * 1000, images, key)
            request_images_var.reset(images_token)
            request_id_var.reset(token)


def _log_access(method: str, path: str, status: int, ms: float, images: list, key: str) -> None:
    fields = {"method": method, "path": path, "status": status, "ms": round(ms, 2), "key": key}
    if images:
        brands = sorted({brand for image in images for brand in image[0]})
        fields.update(
            brands=brands,
            images=len(images),
            queue_ms=round(sum(i[1] for i in images), 2),
            lora_ms=round(sum(i[2] for i in images), 2),
            generation_ms=round(sum(i[3] for i in images), 2),
        )
    text = " ".join(f"{k}={','.join(v) or '-' if isinstance(v, list) else v}" for k, v in fields.items())
    access_logger.info("%s", text, extra={"fields": fields})


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413, whether or not Content-Length is sent.

    Without a Content-Length the body is read here, up to the limit, before the app sees it: an
    exception raised from inside the app's `receive` would reach FastAPI's body parser, which turns
    any error into a 400 "error parsing the body".
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_image_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.max_image_bytes = max_bytes if max_image_bytes is None else max_image_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_upload(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)  # uploads are bounded by LORA_MAX_FILE_MB instead
        limit = self.max_image_bytes if takes_images(scope["method"], scope["path"]) else self.max_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(scope, receive, send, limit)
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client went away before sending the whole body: let the app see the disconnect.
                return await self.app(scope, _replay([message], receive), send)
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                return await self._refuse(scope, receive, send, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    async def _refuse(self, scope, receive, send, limit: int) -> None:
        response = JSONResponse(
            status_code=413, content={"detail": f"request body is larger than the limit of {limit} bytes"}
        )
        await response(scope, receive, send)


# Requests that may carry images (init_image, mask_image, multipart files): MAX_IMAGE_BODY_BYTES applies.
IMAGE_PATHS = ("/generate", "/jobs", "/v1/images/edits", "/sdapi/v1/img2img", "/sdapi/v1/txt2img", "/sdapi/v1/png-info")


def takes_images(method: str, path: str) -> bool:
    return method == "POST" and path.rstrip("/") in IMAGE_PATHS


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives back `messages` first, then what the server sends (e.g. a disconnect)."""
    pending = list(messages)

    async def replaying_receive() -> Message:
        return pending.pop(0) if pending else await receive()

    return replaying_receive


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None
