"""What the running app holds (settings, LoRA registry and facts, and once loaded the engine and the
services), its life cycle (background loading, draining on SIGTERM) and whether it is ready."""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.config import Settings
from app.lora.catalog import LoraCatalog
from app.lora.file_facts import LoraFileFacts
from app.lora.registry import LoraRegistry
from app.train.jobs import TrainJobs

logger = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    registry: LoraRegistry
    facts: LoraFileFacts
    catalog: LoraCatalog
    engine: object | None = None  # DiffusionEngine, once loaded
    loras: object | None = None  # LoraManager
    service: object | None = None  # GenerationService
    queue: object | None = None  # GenerationQueue
    ab_store: object | None = None  # AbStore, opened on first use
    metrics: object | None = None  # ServiceMetrics
    train_jobs: object | None = None  # TrainJobs (training runs in child processes)
    jobs: object | None = None  # JobRunner (POST /jobs), started with the app
    preload: dict[str, str | None] = field(default_factory=dict)
    load_error: str | None = None
    draining: bool = False
    _ready: threading.Event = field(default_factory=threading.Event)
    _start_lock: threading.Lock = field(default_factory=threading.Lock)
    _loader: threading.Thread | None = None
    _stop_hashing: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def for_settings(cls, settings: Settings) -> AppState:
        registry = LoraRegistry(settings.lora_base_dir)
        facts = LoraFileFacts(settings.lora_max_file_mb * 1024 * 1024)
        state = cls(settings=settings, registry=registry, facts=facts, catalog=LoraCatalog(registry, facts))
        state.train_jobs = TrainJobs(settings, on_published=state._on_trained)
        return state

    def _on_trained(self, brand_id: str, version: str) -> None:
        # The registry reads the disk per request, so the new version is already the latest; a flat
        # 'default' file of the brand it now shadows leaves the cache (as after an upload).
        if self.loras is not None:
            self.loras.cache.remove(brand_id)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def not_ready_reason(self) -> tuple[str, str | None] | None:
        """(status, why) when the service should not get new traffic; None when it should."""
        if self.draining:
            return "draining", "the service is shutting down"
        if self.load_error:
            return "failed", f"the model failed to load: {self.load_error}"
        if not self.ready:
            return "loading", "the model is still loading; retry shortly"
        stalled = self.queue.stalled_for()
        if stalled is not None:
            return "stalled", f"the generation worker has made no progress for {stalled:.0f} s (WATCHDOG_S)"
        return None

    def start(self) -> None:
        """Begin loading in the background, once per app; a restarted app gets a fresh queue."""
        with self._start_lock:
            self.draining = False
            if self._loader is None:
                self._loader = threading.Thread(target=self.load, name="model-loader", daemon=True)
                self._loader.start()
            elif self.ready and self.queue.closed:
                self.queue = self._new_queue(self.engine)
                self.service.queue = self.queue

    def stop(self) -> None:
        """Release what the app holds between starts; the loaded model stays; a training child is stopped."""
        self._stop_hashing.set()
        self.train_jobs.shutdown()
        if self.queue is not None:
            self.queue.shutdown()
        if self.ab_store is not None:
            self.ab_store.close()
            self.ab_store = None

    def load(self) -> None:
        """Load the model and preload brands; runs in a background thread so /health answers at once."""
        # Imported here: torch and diffusers take seconds to import and are not needed for /health.
        from app.engine.diffusion import DiffusionEngine
        from app.lora.manager import LoraManager
        from app.service import GenerationService

        s = self.settings
        try:
            engine = DiffusionEngine(s)
            loras = LoraManager(
                self.registry, self.facts, engine, s.lora_cache_enabled, s.lora_cache_max_size,
                s.lora_host_cache_mb * 2**20,
            )  # fmt: skip
            self.preload = loras.preload(s.preload_brands)
            self.queue = self._new_queue(engine)
            self.engine, self.loras = engine, loras
            self.service = GenerationService(s, loras, self.queue, self.metrics)
            # The model's objects live as long as the process: move them out of the garbage collector's
            # reach, so the collections that request allocations trigger do not walk them every time.
            gc.freeze()
            self._ready.set()
            logger.info("ready: model %s on %s (%s)", s.model_id, engine.device, engine.dtype)
            if s.lora_hash_on_start:
                threading.Thread(target=self._hash_lora_files, name="lora-hash", daemon=True).start()
        except Exception as exc:  # reported by /ready; the process stays up to say why
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("loading the model failed")

    def _hash_lora_files(self) -> None:
        """Hash each brand's latest file once, beside the service (LORA_HASH_ON_START), so that its
        first cache miss does not: on a rank-64 SD 1.5 LoRA that is 35 ms of a 65 ms read."""
        try:  # Linux: a thread's own priority (nice 10), so images being generated keep the cores first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        start = time.perf_counter()
        hashed = self.facts.learn(self.registry.latest_files(), self._stop_hashing)
        logger.info("hashed %d LoRA files in %.1f s", hashed, time.perf_counter() - start)

    def _new_queue(self, engine):
        from app.queueing import GenerationQueue

        s = self.settings
        metrics = self.metrics
        return GenerationQueue(
            lambda jobs, on_step: engine.generate_batch(jobs, on_step=on_step),
            s.max_queue_size,
            s.request_timeout_s,
            s.watchdog_s,
            batch_max_size=s.batch_max_size,
            batch_wait_ms=s.batch_wait_ms,
            # Per-image deltas are forward hooks: a compiled UNet would recompile for them.
            mixed=s.batch_mixed and not s.compile_unet,
            on_batch=None if metrics is None else metrics.generation_batch_size.observe,
        )

    def begin_drain(self) -> None:
        """Take no new work (/ready and new generations answer 503); work already accepted goes on."""
        self.draining = True
        logger.warning("draining: new work is refused; waiting for %d accepted requests", self.busy())

    def busy(self) -> int:
        return self.queue.depth if self.queue is not None else 0

    def wait_drained(self, grace_s: float) -> bool:
        """Wait until accepted work is done or `grace_s` passed; True when nothing was left."""
        deadline = time.monotonic() + grace_s
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.busy() == 0


def install_sigterm_drain(state: AppState) -> Callable[[], None]:
    """On SIGTERM: drain (see `begin_drain`), then let the server shut down. Returns the undo.

    Servers stop listening as soon as they get SIGTERM, so a load balancer could not even see /ready
    turn 503. This handler keeps serving while accepted work finishes (up to SHUTDOWN_GRACE_S), then
    asks the server to exit as if the signal had just arrived. Installed only in the main thread (the
    server's); elsewhere (tests' in-process clients) there is no signal to handle.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def finish() -> None:
        drained = state.wait_drained(state.settings.shutdown_grace_s)
        if not drained:
            logger.warning("draining: %d requests still running after SHUTDOWN_GRACE_S; exiting", state.busy())
        server = getattr(previous, "__self__", None)
        if server is not None and hasattr(server, "should_exit"):
            server.should_exit = True  # uvicorn: a normal shutdown, exit status 0
        elif callable(previous):
            previous(signal.SIGTERM, None)
        else:
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)

    def on_sigterm(signum, frame) -> None:
        if state.draining:
            return
        state.begin_drain()
        threading.Thread(target=finish, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


def install_sighup_reload(reload: Callable[[str], object]) -> Callable[[], None]:
    """On SIGHUP: `reload("SIGHUP")` (the keys file), in a thread, not in the signal handler. Returns the undo."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return lambda: None
    previous = signal.getsignal(signal.SIGHUP)

    def on_sighup(signum, frame) -> None:
        threading.Thread(target=reload, args=("SIGHUP",), name="sighup-reload", daemon=True).start()

    signal.signal(signal.SIGHUP, on_sighup)
    return lambda: signal.signal(signal.SIGHUP, previous)
