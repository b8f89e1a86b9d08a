"""The only owner of the diffusers pipeline: executes generation jobs, one at a time.

One pipeline, one generation at a time (the pipeline and its scheduler hold state). Before a job
runs, its LoRA set is merged into the weights (app/engine/merge.py); LoRA files are read into device
factors outside the generation lock, so a cache miss never stalls the image being generated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from app.config import Settings
from app.engine.cpu_threads import one_cpu_thread
from app.engine.loading import load_pipeline, resolve_device, resolve_dtype
from app.engine.lora_weights import LoraWeights, adaptable_modules, fit_layers, read_lora_file
from app.engine.merge import AdapterMerger
from app.engine.per_sample import per_sample_deltas
from app.engine.preview import latent_preview
from app.engine.schedulers import make_scheduler
from app.errors import GenerationOutOfMemory
from app.jobs import GenerationJob, GenerationSpec, JobResult
from app.lora.registry import Fingerprint
from app.lora.safetensors_header import LoraHeaderInfo, read_lora_header

logger = logging.getLogger(__name__)

CLIP_MAX_TOKENS = 77


def compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class DiffusionEngine:
    def __init__(self, settings: Settings):
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.pipe, self.model_path = load_pipeline(settings, self.device, self.dtype)
        # A compiled UNet wraps the real one (`_orig_mod`); LoRA layer names refer to the real one.
        unet = getattr(self.pipe.unet, "_orig_mod", self.pipe.unet)
        self._targets = adaptable_modules({"unet": unet, "text_encoder": self.pipe.text_encoder})
        self.merger = AdapterMerger(self._targets)
        self._lock = threading.Lock()
        # Each generation gets its own scheduler (they hold per-run state), built from the model's own.
        self._scheduler_class = type(self.pipe.scheduler)
        self._scheduler_config = self.pipe.scheduler.config
        self.compiled = settings.compile_unet
        self.compile_seconds = self._warm_up(settings.compile_warmup_size) if self.compiled else None

    def read_adapter(
        self,
        path: Path,
        header: LoraHeaderInfo | None = None,
        known_sha256: tuple[Fingerprint, str] | None = None,
    ) -> LoraWeights:
        """Read a LoRA file into factors in host memory, in the model's dtype (pinned when the model is
        on a GPU). No lock needed: a load never stalls a generation.

        `header` is the safety gate's result when the caller already ran it (the LoRA manager does);
        without it the gate runs here. `known_sha256`: (fingerprint, sha256) of a version hashed
        before, so that reading that version does not hash it again (see `read_lora_file`).
        """
        if header is None:
            header = read_lora_header(path, max_bytes=Path(path).stat().st_size)
        # Usually on a request thread while another image generates: one core (app/engine/cpu_threads.py).
        with one_cpu_thread():
            layers, sha256, fingerprint = read_lora_file(path, header, known_sha256)
            host = fit_layers(layers, self._targets, "cpu", self.dtype, sha256, fingerprint)
            return host if self.device == "cpu" else host.pin_memory()

    def to_device(self, host: LoraWeights) -> LoraWeights:
        """The factors on the engine's device (the same object on a CPU engine: nothing is copied)."""
        return host if self.device == "cpu" else host.to(self.device)

    def load_adapter(self, path: Path, header: LoraHeaderInfo | None = None) -> LoraWeights:
        """`read_adapter` then `to_device`: a LoRA file ready to merge."""
        return self.to_device(self.read_adapter(path, header))

    def generate(
        self, job: GenerationJob, output_type: str = "pil", on_step: Callable[[], None] | None = None
    ) -> JobResult:
        """Generate one image; `output_type="np"` gives the float image in 0..1 (for exact comparisons).

        `on_step` is called after every denoising step (the queue's watchdog counts it as progress).
        """
        return self.generate_batch([job], output_type, on_step)[0]

    def generate_batch(
        self, jobs: list[GenerationJob], output_type: str = "pil", on_step: Callable[[], None] | None = None
    ) -> list[JobResult]:
        """Generate the jobs' images in one denoising loop (they share size, steps, guidance, sampler).

        One LoRA set: merged into the weights, as for a single job. Several sets: each set's text
        encoder is merged in turn to encode its prompts, and the UNet runs on base weights with each
        image's low-rank deltas (app/engine/per_sample.py). Each image uses its own seeded generator,
        so it equals its single-job image up to the float rounding of batched kernels.
        """
        if len({job.batch_key for job in jobs}) != 1:
            raise ValueError("jobs of one batch must share size, steps, guidance and sampler")
        with self._lock:
            # Inside the lock: the fast tokenizer's truncation setting is shared state the pipeline also sets.
            warnings = [self._prompt_warnings(job.spec) for job in jobs]
            t0 = time.perf_counter()
            one_set = len({job.merge_signature for job in jobs}) == 1
            if one_set:
                self.merger.activate(jobs[0].adapters)
                embeddings = None
            else:
                embeddings = self._encode_per_set(jobs)
            t1 = time.perf_counter()
            loop = _StepLoop([job.control for job in jobs], on_step)
            try:
                if one_set:
                    images = self._run_pipeline([job.spec for job in jobs], output_type, loop)
                else:
                    with per_sample_deltas(self._targets, [job.adapters for job in jobs]):
                        images = self._run_pipeline([job.spec for job in jobs], output_type, loop, embeddings)
            except torch.OutOfMemoryError as exc:
                if self.device == "cuda":
                    torch.cuda.empty_cache()
                raise GenerationOutOfMemory(str(exc).splitlines()[0]) from exc
            t2 = time.perf_counter()
        n = len(jobs)
        return [
            JobResult(images[i], (t1 - t0) * 1000 / n, (t2 - t1) * 1000 / n, warnings[i], n, loop.stopped_at)
            for i in range(n)
        ]

    def _warm_up(self, size: int) -> float:
        """Compile at start-up (one short generation), so no request pays it; returns the seconds."""
        start = time.perf_counter()
        self.generate(GenerationJob(GenerationSpec("warm-up", None, size, size, 2, 7.5, 0)), output_type="latent")
        seconds = time.perf_counter() - start
        logger.info("compiled the UNet in %.1f s (%s)", seconds, compiled_graphs())
        return seconds

    def compile_stats(self) -> dict | None:
        """Compilation so far: None when the UNet is not compiled. A LoRA switch must leave `graphs` alone."""
        if not self.compiled:
            return None
        return {"compile_seconds": round(self.compile_seconds, 1), "graphs": compiled_graphs()}

    def restore_base(self) -> None:
        """Put the pristine base weights back (used when the adapter cache is cleared)."""
        with self._lock:
            self.merger.restore_base()

    def _run_pipeline(self, specs: list[GenerationSpec], output_type: str, loop: _StepLoop, embeddings=None) -> list:
        first = specs[0]
        # The generators live on the CPU so that a seed gives the same image on every device; one per
        # image, so each image's noise is what it would be alone.
        generators = [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]
        # A new scheduler for this call only (the generation lock is held here).
        self.pipe.scheduler = make_scheduler(first.scheduler, self._scheduler_class, self._scheduler_config)

        if embeddings is not None:
            text = {"prompt_embeds": embeddings[0], "negative_prompt_embeds": embeddings[1]}
        elif len(specs) == 1:  # a single job is called exactly as diffusers' own single-image call
            text = {"prompt": first.prompt, "negative_prompt": first.negative_prompt or None}
        else:
            negatives = [spec.negative_prompt or "" for spec in specs]
            text = {"prompt": [spec.prompt for spec in specs], "negative_prompt": negatives if any(negatives) else None}
        with torch.inference_mode():
            try:
                images = self.pipe(
                    **text,
                    width=first.width,
                    height=first.height,
                    num_inference_steps=first.num_inference_steps,
                    guidance_scale=first.guidance_scale,
                    generator=generators[0] if len(specs) == 1 else generators,
                    output_type=output_type,
                    callback_on_step_end=loop.step_done,
                ).images
            except _AllDiscarded:
                return [None] * len(specs)  # every image was canceled: nothing to decode
        return list(images)

    def _encode_per_set(self, jobs: list[GenerationJob]) -> tuple:
        """Prompt embeddings of a mixed batch: each LoRA set's text-encoder layers merged in turn for its
        jobs' prompts. The UNet is left with its base weights (its deltas are added per image)."""
        cfg = jobs[0].spec.guidance_scale > 1.0
        positive, negative = [None] * len(jobs), [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.merge_signature, []).append(i)
        with torch.inference_mode():
            for members in groups.values():
                self.merger.activate(jobs[members[0]].adapters, components=("text_encoder",))
                prompts = [jobs[i].spec.prompt for i in members]
                negatives = [jobs[i].spec.negative_prompt or "" for i in members]
                pos, neg = self.pipe.encode_prompt(prompts, self.pipe.device, 1, cfg, negatives)
                for row, i in enumerate(members):
                    positive[i] = pos[row : row + 1]
                    negative[i] = neg[row : row + 1] if cfg else None
        return torch.cat(positive), (torch.cat(negative) if cfg else None)

    def _prompt_warnings(self, spec: GenerationSpec) -> list[str]:
        warnings = []
        for field_name in ("prompt", "negative_prompt"):
            text = getattr(spec, field_name)
            if text:
                n = len(self.pipe.tokenizer(text, truncation=False).input_ids)
                if n > CLIP_MAX_TOKENS:
                    warnings.append(
                        f"{field_name} is {n} tokens; CLIP reads only the first {CLIP_MAX_TOKENS}, the rest is ignored"
                    )
        return warnings


class _AllDiscarded(Exception):
    """Raised from the step callback to leave a loop whose every image was canceled (no decode)."""


class _StepLoop:
    """The step callback of one denoising loop: the watchdog's `on_step`, each image's `StepControl`
    (progress, previews, stop requests). The loop stops only when every image asked to stop."""

    def __init__(self, controls: list, on_step: Callable[[], None] | None):
        self.controls = controls
        self.on_step = on_step
        self.stopped_at: int | None = None
        self._watched = any(c is not None for c in controls)

    def step_done(self, pipe, index: int, _timestep, tensors: dict) -> dict:
        if self.on_step is not None:
            self.on_step()
        if not self._watched:
            return tensors
        step, steps = index + 1, pipe.num_timesteps
        latents = tensors["latents"]
        for i, control in enumerate(self.controls):
            if control is not None:
                preview = latent_preview(latents[i]) if control.wants_preview(step, steps) else None
                control.report(step, steps, preview)
        modes = [None if c is None else c.stop_mode for c in self.controls]
        if step < steps and all(mode is not None for mode in modes):
            self.stopped_at = step
            if all(mode == "discard" for mode in modes):
                raise _AllDiscarded()
            pipe._interrupt = True  # diffusers skips the remaining steps and decodes the latents reached
        return tensors
