"""One generation request from validated input to a PNG: LoRA set, queue, engine, encoding.

The routes call `GenerationService.generate`; it is the one place that knows the order of the
steps. It never touches torch: the engine does.
"""

from __future__ import annotations

import base64
import io
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.engine.pipeline import DiffusionEngine, GenerationSpec
from app.lora.manager import AppliedLora, LoraManager, LoraSpec
from app.queueing import GenerationQueue


class InvalidRequest(ValueError):
    """A request that passed the schema but breaks a configured limit; `field` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class GenerationOutcome:
    png: bytes
    seed: int
    width: int
    height: int
    loras: list[AppliedLora]
    warnings: list[str]
    queue_ms: float
    lora_ms: float
    generation_ms: float
    total_ms: float

    @property
    def image_base64(self) -> str:
        return base64.b64encode(self.png).decode("ascii")


logger = logging.getLogger(__name__)


class GenerationService:
    def __init__(
        self, settings: Settings, engine: DiffusionEngine, loras: LoraManager, queue: GenerationQueue, metrics=None
    ):
        self.settings = settings
        self.metrics = metrics
        self.engine = engine
        self.loras = loras
        self.queue = queue

    def check_limits(self, width: int, height: int, steps: int, lora_count: int) -> None:
        s = self.settings
        if width > s.max_width:
            raise InvalidRequest("width", f"width {width} is above the maximum of {s.max_width}")
        if height > s.max_height:
            raise InvalidRequest("height", f"height {height} is above the maximum of {s.max_height}")
        if width * height > s.max_pixels:
            raise InvalidRequest(
                "width", f"width x height = {width * height} pixels is above the maximum of {s.max_pixels}"
            )
        if steps > s.max_steps:
            raise InvalidRequest(
                "num_inference_steps", f"num_inference_steps {steps} is above the maximum of {s.max_steps}"
            )
        if lora_count > s.lora_max_per_request:
            raise InvalidRequest(
                "lora_configs", f"{lora_count} LoRAs requested; at most {s.lora_max_per_request} per request"
            )

    async def generate(
        self,
        spec: GenerationSpec,
        loras: list[LoraSpec],
        strict: bool = False,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> GenerationOutcome:
        start = time.perf_counter()
        self.queue.reserve()  # refuse early, before any file work, when the queue is full
        try:
            acquired = await run_in_threadpool(self.loras.acquire, loras, strict)
        except BaseException:
            self.queue.release_reservation()
            raise
        try:
            result, queue_ms = await self.queue.run(
                lambda: self.engine.generate(spec, acquired.adapters), disconnected
            )
        finally:
            self.loras.release(acquired)
        if self.metrics is not None:
            self.metrics.generation_seconds.observe(result.generation_ms / 1000)
        png = await run_in_threadpool(encode_png, result.image)
        return GenerationOutcome(
            png=png,
            seed=spec.seed,
            width=spec.width,
            height=spec.height,
            loras=acquired.applied,
            warnings=acquired.warnings + result.warnings,
            queue_ms=queue_ms,
            lora_ms=acquired.load_ms + result.lora_ms,
            generation_ms=result.generation_ms,
            total_ms=(time.perf_counter() - start) * 1000,
        )


def draw_seed() -> int:
    return secrets.randbelow(2**32)


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
