"""What the running app holds: settings, the LoRA registry, and (once loaded) engine and services."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from app.config import Settings
from app.lora.catalog import LoraCatalog
from app.lora.registry import LoraRegistry

logger = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    registry: LoraRegistry
    catalog: LoraCatalog
    engine: object | None = None  # DiffusionEngine, once loaded
    loras: object | None = None  # LoraManager
    service: object | None = None  # GenerationService
    queue: object | None = None  # GenerationQueue
    ab_store: object | None = None  # AbStore, opened on first use
    metrics: object | None = None  # ServiceMetrics
    preload: dict[str, str | None] = field(default_factory=dict)
    load_error: str | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _start_lock: threading.Lock = field(default_factory=threading.Lock)
    _loader: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def start(self) -> None:
        """Begin loading in the background, once per app; a restarted app gets a fresh queue."""
        with self._start_lock:
            if self._loader is None:
                self._loader = threading.Thread(target=self.load, name="model-loader", daemon=True)
                self._loader.start()
            elif self.ready and self.queue.closed:
                from app.queueing import GenerationQueue

                self.queue = GenerationQueue(self.settings.max_queue_size, self.settings.request_timeout_s)
                self.service.queue = self.queue

    def stop(self) -> None:
        """Release what the app holds between starts; the loaded model stays."""
        if self.queue is not None:
            self.queue.shutdown()
        if self.ab_store is not None:
            self.ab_store.close()
            self.ab_store = None

    def load(self) -> None:
        """Load the model and preload brands; runs in a background thread so /health answers at once."""
        # Imported here: torch and diffusers take seconds to import and are not needed for /health.
        from app.engine.pipeline import DiffusionEngine
        from app.lora.manager import LoraManager
        from app.queueing import GenerationQueue
        from app.service import GenerationService

        s = self.settings
        try:
            engine = DiffusionEngine(s)
            loras = LoraManager(self.registry, engine, s.lora_cache_enabled, s.lora_cache_max_size, s.lora_max_file_mb)
            self.preload = loras.preload(s.preload_brands)
            self.queue = GenerationQueue(s.max_queue_size, s.request_timeout_s)
            self.engine, self.loras = engine, loras
            self.service = GenerationService(s, engine, loras, self.queue, self.metrics)
            self._ready.set()
            logger.info("ready: model %s on %s (%s)", s.model_id, engine.device, engine.dtype)
        except Exception as exc:  # reported by /ready; the process stays up to say why
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("loading the model failed")
