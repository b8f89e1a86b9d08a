"""The value types of one request's path, from the HTTP layer to the engine. No torch here.

Every entry point (`/generate`, an A/B variant, and later other APIs or a remote replica) turns its
request into the same `GenerationJob`: the image settings plus the resolved LoRA set. The queue holds
jobs and the engine executes them. The adapter weights a job carries are opaque here (the engine's
tensors); what crosses a process boundary is the spec and the set's keys, never the tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class GenerationSpec:
    """The settings of one image (what the pipeline is called with)."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scheduler: str = "pndm"  # a name of app/samplers.py; a fresh instance per generation
    # The prompt as the client sent it, <lora:...> tags included, for the PNG infotext; `prompt` (what
    # the text encoder reads) has the tags removed. None: the same as `prompt`.
    prompt_as_sent: str | None = None


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA a request asks for: a brand, its weight, optionally a version and a free label."""

    brand_id: str
    weight: float = 0.8
    version: str | None = None
    type: str | None = None

    @property
    def ref(self) -> tuple[str, str | None]:
        """What a request names: (brand, version or None for the latest). Weights do not matter here."""
        return (self.brand_id, self.version)


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA as it was applied, for the response: the exact file and its hash."""

    brand_id: str
    version: str
    weight: float
    type: str | None
    file: str  # relative to the LoRA root
    sha256: str


@dataclass(frozen=True)
class ActiveAdapter:
    """One adapter of a job's set: its cache key (`brand` or `brand@v2`), weights and the weight to apply."""

    key: str
    weights: Any  # the engine's resident factors; opaque outside the engine
    weight: float


# (step, steps, preview): called by the engine after each denoising step; `step` counts from 1 to `steps`
# (the steps the loop runs); `preview` is None or an RGB uint8 array (h, w, 3), at most 128 px a side,
# projected from the latents (no VAE decode).
StepListener = Callable[[int, int, Any], None]
StopMode = Literal["discard", "finish"]


class StepControl:
    """One image's handle on the denoising loop it runs in: progress out, a stop request in. No torch.

    The queue calls `start` when the image's loop is taken up, the engine calls `report` after every
    step (both from the generation thread) and stops the loop at the
    next step once every image of the loop has asked to stop. Two ways to stop:
    - `cancel()` ("discard"): the image is not wanted; its request fails with `JobCanceled`. A loop whose
      images are all discarded ends at once, without decoding.
    - `finish_early()` ("finish"): stop denoising and decode the latents reached (AUTOMATIC1111's
      interrupt); the request gets that image, with `JobResult.stopped_at` set.
    In a loop shared with images that go on, a stopped image is computed to the end and dropped
    ("discard") or returned at the end ("finish"): the others' images still come out.
    Asking twice is harmless; the first mode asked wins.
    """

    def __init__(
        self,
        listener: StepListener | None = None,
        preview_every: int = 0,
        on_start: Callable[[], None] | None = None,
    ):
        self.listener = listener
        self.preview_every = preview_every  # 0: no previews
        self.on_start = on_start  # called (generation thread) when the image's denoising loop begins
        self.started = False
        self.step = 0
        self.steps = 0
        self._stop: StopMode | None = None
        self._lock = threading.Lock()

    def cancel(self) -> bool:
        """Drop this image at the next step; True when this call asked first."""
        return self._ask("discard")

    def finish_early(self) -> bool:
        """Stop at the next step and keep the image reached; True when this call asked first."""
        return self._ask("finish")

    def _ask(self, mode: StopMode) -> bool:
        with self._lock:
            if self._stop is not None:
                return False
            self._stop = mode
            return True

    @property
    def stop_mode(self) -> StopMode | None:
        return self._stop

    @property
    def discarded(self) -> bool:
        return self._stop == "discard"

    def wants_preview(self, step: int, steps: int) -> bool:
        """Previews every `preview_every` steps, and at the last step."""
        return self.preview_every > 0 and (step % self.preview_every == 0 or step == steps)

    def start(self) -> None:
        self.started = True
        if self.on_start is not None:
            self.on_start()

    def report(self, step: int, steps: int, preview: Any = None) -> None:
        self.step, self.steps = step, steps
        if self.listener is not None:
            self.listener(step, steps, preview)


@dataclass(frozen=True)
class GenerationJob:
    """One image to generate: the settings and the LoRA set, resolved and held for the job's lifetime."""

    spec: GenerationSpec
    adapters: tuple[ActiveAdapter, ...] = ()
    # Progress and stop requests of this image (jobs API, AUTOMATIC1111's progress/interrupt); None: none.
    control: StepControl | None = field(default=None, compare=False)

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one denoising loop (prompts, seeds and LoRAs may differ)."""
        s = self.spec
        return (s.width, s.height, s.num_inference_steps, s.guidance_scale, s.scheduler)

    @property
    def merge_signature(self) -> tuple[tuple[str, int, float], ...]:
        """What merged weights would hold for this job: its non-zero adapters (key, weights object, weight),
        by key. The object, not only the key: a file replaced between two requests gives two sets. Only
        compared between live jobs (which hold their weights), so an id cannot be reused meanwhile."""
        return tuple(sorted((a.key, id(a.weights), a.weight) for a in self.adapters if a.weight != 0.0))

    @property
    def lora_set_key(self) -> str:
        """The canonical name of the set the image needs: sorted keys of non-zero adapters, no weights.

        Weight-0 adapters change nothing (W + 0 * delta is W), so they are not part of the set.
        """
        return "+".join(sorted(a.key for a in self.adapters if a.weight != 0.0))


@dataclass
class JobResult:
    image: Any  # PIL.Image.Image, or a float array for output_type="np"
    lora_ms: float  # switching adapters (merging the set into the weights); a batch's, split per image
    generation_ms: float  # the denoising loop; a batch's, split per image
    warnings: list[str] = field(default_factory=list)
    batch_size: int = 1  # images in the denoising loop this image ran in
    stopped_at: int | None = None  # the step the loop stopped at when stopped early (StepControl); None: ran out
