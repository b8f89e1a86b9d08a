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

from app.access import charge_images, check_brands, current_caller, prepay_images
from app.config import Settings
from app.editing import check_pixels
from app.errors import InvalidRequest
from app.infotext import PNG_TEXT_KEY, build_infotext, prompt_with_lora_tags
from app.jobs import AppliedLora, GenerationJob, GenerationSpec, LoraSpec, StepControl
from app.lora.manager import AcquiredLoras, LoraManager
from app.lora.registry import DEFAULT_VERSION
from app.observability import record_image
from app.prompt_tags import InvalidPromptTag, parse_prompt_tags
from app.queueing import GenerationQueue

Disconnected = Callable[[], Awaitable[bool]] | None


@dataclass
class GenerationOutcome:
    image: object  # PIL.Image.Image
    png: bytes
    infotext: str  # the PNG's `parameters` text (AUTOMATIC1111's layout), as written into `png`
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
    stopped_at: int | None = None  # the step it was stopped at (StepControl.finish_early); None: all steps

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
        """The request bounds, checked here only (the schema leaves them to the settings): one message per field."""
        s = self.settings
        values = {"width": width, "height": height, "num_inference_steps": steps}
        for name, (setting, maximum) in s.request_maxima.items():
            if values[name] > maximum:
                raise InvalidRequest(name, f"{name} {values[name]} is above the maximum of {maximum} ({setting})")
        if width * height > s.max_pixels:
            raise InvalidRequest(
                "width", f"width x height = {width * height} pixels is above the maximum of {s.max_pixels} (MAX_PIXELS)"
            )
        if lora_count > s.lora_max_per_request:
            raise InvalidRequest(
                "lora_configs",
                f"{lora_count} LoRAs requested; at most {s.lora_max_per_request} per request (LORA_MAX_PER_REQUEST)",
            )

    # Who may use which brand, and the caller's quota, are checked in `admit`, which `generate` and
    # `acquire` always call: a subclass (the Ray ingress) changes `_generate` / `_acquire` instead, so
    # no image path can skip the check.
    _FINAL = ("generate", "acquire", "admit")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        overridden = [name for name in cls._FINAL if name in vars(cls)]
        if overridden:
            raise TypeError(f"{cls.__name__} overrides {', '.join(overridden)}: override _generate / _acquire "
                            "so that every image passes the caller's checks")  # fmt: skip

    def admit(self, loras: Sequence[LoraSpec], images: int = 1, prepay: bool = False) -> None:
        """The caller's brands and quota, where the request's LoRA set is final (403 / 429 before any work).

        `prepay`: only make sure `images` images are paid for (an endpoint that then calls `generate`
        once per image, so that all are refused at once or none); each `generate` uses one of them.
        """
        caller = current_caller.get()
        check_brands(caller, loras)
        (prepay_images if prepay else charge_images)(caller, images)

    def check_edit(self, spec: GenerationSpec) -> None:
        """An edit's init image as sent is bounded by MAX_PIXELS too (it was decoded within the schema's bound)."""
        if spec.edit is not None and spec.edit.source_size is not None:
            check_pixels(spec.edit.source_size, self.settings.max_pixels, "init_image")

    async def generate(
        self,
        spec: GenerationSpec,
        loras: Sequence[LoraSpec],
        strict: bool = False,
        disconnected: Disconnected = None,
        control: StepControl | None = None,
    ) -> GenerationOutcome:
        """One image: the caller's checks, then reserve a place, acquire the LoRAs, run the job.

        `control` follows the image's denoising steps and can stop it (app/jobs.py `StepControl`); a
        canceled image raises `JobCanceled`.
        """
        self.check_edit(spec)
        self.admit(loras)
        return await self._generate(spec, loras, strict, disconnected, control)

    async def _generate(
        self,
        spec: GenerationSpec,
        loras: Sequence[LoraSpec],
        strict: bool,
        disconnected: Disconnected,
        control: StepControl | None = None,
    ) -> GenerationOutcome:
        start = time.perf_counter()
        acquired = await self._acquire(loras, strict)
        return await self.render(spec, acquired, loras, disconnected, start, control)

    async def acquire(self, loras: Sequence[LoraSpec], strict: bool = False, images: int = 1) -> AcquiredLoras:
        """The caller's checks for `images` images of `loras`, then a place in the queue and the LoRAs.

        The place is the next `render`'s; give it back with `queue.release_reservation` if none follows.
        """
        self.admit(loras, images)
        return await self._acquire(loras, strict)

    async def _acquire(self, loras: Sequence[LoraSpec], strict: bool) -> AcquiredLoras:
        """Take a place in the queue (429 at once when full, before any file work), then load the LoRAs."""
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
        control: StepControl | None = None,
    ) -> GenerationOutcome:
        """Run one job with `loras` (a subset of `acquired`, at their own weights) in the reserved place."""
        start = time.perf_counter() if start is None else start
        adapters, applied, warnings = acquired.select(loras)
        load_ms = acquired.take_load_ms()  # the first image of an acquisition carries its file loading
        result, queue_ms = await self.queue.submit(GenerationJob(spec, tuple(adapters), control), disconnected)
        if self.metrics is not None:
            self.metrics.generation_seconds.observe(result.generation_ms / 1000)
        infotext = generation_infotext(spec, applied, self.settings.model_id)
        png = await run_in_threadpool(encode_png, result.image, infotext)
        width, height = image_size(result.image, spec)  # only-masked inpainting answers at the init image's size
        brands = [a.key for a in adapters if a.weight != 0.0]
        record_image(brands, queue_ms, load_ms + result.lora_ms, result.generation_ms)
        return GenerationOutcome(
            image=result.image,
            png=png,
            infotext=infotext,
            seed=spec.seed,
            width=width,
            height=height,
            loras=applied,
            warnings=warnings + result.warnings,
            queue_ms=queue_ms,
            lora_ms=load_ms + result.lora_ms,
            generation_ms=result.generation_ms,
            total_ms=(time.perf_counter() - start) * 1000,
            batch_size=result.batch_size,
            stopped_at=result.stopped_at,
        )


def image_size(image, spec: GenerationSpec) -> tuple[int, int]:
    """A PIL image's (width, height); the spec's size for anything else."""
    size = getattr(image, "size", None)
    return size if isinstance(size, tuple) else (spec.width, spec.height)


def round_ms(ms: float) -> float:
    """Milliseconds as the API reports them: two decimals."""
    return round(ms, 2)


def draw_seed() -> int:
    return secrets.randbelow(2**32)


def generation_infotext(spec: GenerationSpec, applied: list[AppliedLora], model_id: str) -> str:
    """The PNG's `parameters` text (AUTOMATIC1111's layout, see app/infotext.py).

    Its prompt reproduces the image: the client's prompt, then a `<lora:NAME:WEIGHT>` tag for each LoRA
    applied from `brand_id` / `lora_configs` (the prompt's own tags are there already, once).
    """
    # A LoRA at weight 0 leaves the pixels as the base model's, so it is not listed (same PNG as base).
    used = [a for a in applied if a.weight != 0.0]
    prompt = spec.prompt_as_sent if spec.prompt_as_sent is not None else spec.prompt
    tags = [(lora_name(a), a.weight) for a in loras_outside_the_prompt(prompt, used)]
    return build_infotext(
        prompt=prompt_with_lora_tags(prompt, tags),
        negative_prompt=spec.negative_prompt,
        steps=spec.num_inference_steps,
        scheduler=spec.scheduler,
        guidance_scale=spec.guidance_scale,
        seed=spec.seed,
        width=spec.width,
        height=spec.height,
        model_id=model_id,
        loras=[(a.brand_id, a.sha256) for a in used],
        edit=spec.edit,
    )


def lora_name(applied: AppliedLora) -> str:
    """A tag's NAME for the file that was applied: `brand@vN`, pinned, or `brand` for an unversioned brand."""
    return applied.brand_id if applied.version == DEFAULT_VERSION else f"{applied.brand_id}@{applied.version}"


def loras_outside_the_prompt(prompt: str, applied: list[AppliedLora]) -> list[AppliedLora]:
    """The applied LoRAs that no `<lora:...>` tag of `prompt` stands for (each tag stands for one)."""
    try:
        _, tags = parse_prompt_tags(prompt)
    except InvalidPromptTag:  # the routes refuse such prompts; a prompt not read for tags has none
        tags = []
    left = list(applied)
    for tag in tags:
        # Tags come after brand_id / lora_configs in a request's set: match from the end.
        for lora in reversed(left):
            if lora.brand_id == tag.brand_id and tag.version in (None, lora.version) and lora.weight == tag.weight:
                left.remove(lora)
                break
    return left


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
