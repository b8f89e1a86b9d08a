"""The one path of every image: a request's LoRAs, a typed job, the queue, the engine, a PNG.

`/generate` calls `generate`; an A/B test acquires its LoRAs once (`acquire`) and renders each
variant with `render`. Both build the same `GenerationJob` and put it through the same queue, so an
A/B variant is the `/generate` image with the same settings. No torch here: the engine does that.
"""

from __future__ import annotations

import base64
import io
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, fields

from PIL.PngImagePlugin import PngInfo
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.errors import InvalidRequest
from app.infotext import PNG_TEXT_KEY, build_infotext
from app.jobs import AppliedLora, GenerationJob, GenerationSpec, LoraSpec
from app.lora.manager import AcquiredLoras, LoraManager
from app.observability import record_image
from app.queueing import GenerationQueue

Disconnected = Callable[[], Awaitable[bool]] | None


@dataclass
class GenerationOutcome:
    image: object  # PIL.Image.Image
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
    batch_size: int = 1  # images in the denoising loop this one ran in

    @property
    def image_base64(self) -> str:
        return base64.b64encode(self.png).decode("ascii")

    def timings(self) -> dict[str, float]:
        """The timings as reported: milliseconds, two decimals (the one place they are rounded)."""
        return {name: round_ms(getattr(self, name)) for name in ("queue_ms", "lora_ms", "generation_ms", "total_ms")}

    def to_wire(self) -> dict:
        """Every field as plain data (the image travels as its PNG, the LoRAs as dicts): what a Ray
        replica sends back (app/serve/replica.py), and what a store may keep. It walks the dataclass's
        fields, so a field added here crosses too; `from_wire` is its inverse."""
        wire = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "image"}
        wire["loras"] = [asdict(applied) for applied in self.loras]
        return wire

    @classmethod
    def from_wire(cls, wire: dict, **extra):
        """The outcome `to_wire` wrote, its image decoded from the PNG; `extra`: the fields of a subclass
        that were not on the wire. A field missing from the wire, or unknown here, is a TypeError."""
        data = {**wire, **extra, "loras": [AppliedLora(**applied) for applied in wire["loras"]]}
        return cls(image=decode_png(wire["png"]), **data)


class GenerationService:
    def __init__(self, settings: Settings, loras: LoraManager, queue: GenerationQueue, metrics=None):
        self.settings = settings
        self.loras = loras
        self.queue = queue
        self.metrics = metrics

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
        self, spec: GenerationSpec, loras: Sequence[LoraSpec], strict: bool = False, disconnected: Disconnected = None
    ) -> GenerationOutcome:
        """One image: reserve a place, acquire the LoRAs, run the job."""
        start = time.perf_counter()
        acquired = await self.acquire(loras, strict)
        return await self.render(spec, acquired, loras, disconnected, start)

    async def acquire(self, loras: Sequence[LoraSpec], strict: bool = False) -> AcquiredLoras:
        """Take a place in the queue (429 at once when full, before any file work), then load the LoRAs.

        The place is the next `render`'s; give it back with `queue.release_reservation` if none follows.
        """
        self.queue.reserve()
        try:
            return await run_in_threadpool(self.loras.acquire, loras, strict)
        except BaseException:
            self.queue.release_reservation()
            raise

    async def render(
        self,
        spec: GenerationSpec,
        acquired: AcquiredLoras,
        loras: Sequence[LoraSpec],
        disconnected: Disconnected = None,
        start: float | None = None,
    ) -> GenerationOutcome:
        """Run one job with `loras` (a subset of `acquired`, at their own weights) in the reserved place."""
        start = time.perf_counter() if start is None else start
        adapters, applied, warnings = acquired.select(loras)
        load_ms = acquired.take_load_ms()  # the first image of an acquisition carries its file loading
        result, queue_ms = await self.queue.submit(GenerationJob(spec, tuple(adapters)), disconnected)
        if self.metrics is not None:
            self.metrics.generation_seconds.observe(result.generation_ms / 1000)
        infotext = generation_infotext(spec, applied, self.settings.model_id)
        png = await run_in_threadpool(encode_png, result.image, infotext)
        brands = [a.key for a in adapters if a.weight != 0.0]
        record_image(brands, queue_ms, load_ms + result.lora_ms, result.generation_ms)
        return GenerationOutcome(
            image=result.image,
            png=png,
            seed=spec.seed,
            width=spec.width,
            height=spec.height,
            loras=applied,
            warnings=warnings + result.warnings,
            queue_ms=queue_ms,
            lora_ms=load_ms + result.lora_ms,
            generation_ms=result.generation_ms,
            total_ms=(time.perf_counter() - start) * 1000,
            batch_size=result.batch_size,
        )


def round_ms(ms: float) -> float:
    """Milliseconds as the API reports them: two decimals."""
    return round(ms, 2)


def draw_seed() -> int:
    return secrets.randbelow(2**32)


def generation_infotext(spec: GenerationSpec, applied: list[AppliedLora], model_id: str) -> str:
    """The PNG's `parameters` text (AUTOMATIC1111's layout, see app/infotext.py)."""
    return build_infotext(
        prompt=spec.prompt_as_sent if spec.prompt_as_sent is not None else spec.prompt,
        negative_prompt=spec.negative_prompt,
        steps=spec.num_inference_steps,
        scheduler=spec.scheduler,
        guidance_scale=spec.guidance_scale,
        seed=spec.seed,
        width=spec.width,
        height=spec.height,
        model_id=model_id,
        # A LoRA at weight 0 leaves the pixels as the base model's, so it is not listed (same PNG as base).
        loras=[(a.brand_id, a.sha256) for a in applied if a.weight != 0.0],
    )


def decode_png(png: bytes):
    """The PIL image of PNG bytes, read in full (the bytes may be dropped afterwards)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def encode_png(image, infotext: str | None = None) -> bytes:
    """PNG bytes; `infotext` goes into a `parameters` text chunk (the pixel data is the same)."""
    buffer = io.BytesIO()
    pnginfo = None
    if infotext is not None:
        pnginfo = PngInfo()
        pnginfo.add_text(PNG_TEXT_KEY, infotext)
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return buffer.getvalue()
