"""The only owner of the diffusers pipeline: loading, generation, and merging adapters into it.

One pipeline, one generation at a time (the pipeline and its scheduler hold state). Adapters are
kept resident as low-rank factors on the device; the set a request asks for is merged into the
weights just before its generation, from pristine copies of the touched weights, so switching costs
milliseconds and a denoising step costs the same as the base model's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from app.config import Settings
from app.engine.embedded import embedded_model_path
from app.engine.lora_weights import LoraLayer, LoraWeights, adaptable_modules, fit_layers, read_lora_file

logger = logging.getLogger(__name__)

CLIP_MAX_TOKENS = 77
_MODEL_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class GenerationSpec:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int


@dataclass(frozen=True)
class ActiveAdapter:
    """One adapter of a request's set, with the weight it is applied at."""

    key: str
    weights: LoraWeights
    weight: float


@dataclass
class GenerationResult:
    image: object  # PIL.Image.Image
    lora_ms: float
    generation_ms: float
    warnings: list[str] = field(default_factory=list)


class GenerationOutOfMemory(RuntimeError):
    """The device ran out of memory during one generation; the engine has released what it could."""


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda but no CUDA device is available (use DEVICE=auto or cpu)")
    return setting


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    if setting == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, setting)


class DiffusionEngine:
    def __init__(self, settings: Settings):
        self.settings = settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        # One load at a time per process: diffusers/accelerate patch torch globally while building
        # models on the meta device, so a second load in another thread could get empty weights.
        with _MODEL_LOAD_LOCK:
            self.model_path = self._model_source(settings)
            self.pipe = self._load_pipeline(self.model_path)
        # A compiled UNet wraps the real one (`_orig_mod`); LoRA layer names refer to the real one.
        unet = getattr(self.pipe.unet, "_orig_mod", self.pipe.unet)
        self._targets = adaptable_modules({"unet": unet, "text_encoder": self.pipe.text_encoder})
        self._lock = threading.Lock()
        # Per merged module: (weight, pristine weight, bias, pristine bias), see `_views`.
        self._pristine: dict[tuple[str, str], tuple] = {}
        self._merged_modules: set[tuple[str, str]] = set()
        self._merged_biases: set[tuple[str, str]] = set()  # only LoRAs with a lora_B bias change biases
        # What is merged now: (key, weights object, weight) per adapter. Objects, not keys, so that a
        # reloaded file under the same key never matches the stale merge.
        self._merged_set: tuple[tuple[str, LoraWeights, float], ...] = ()
        self._resident: dict[str, LoraWeights] = {}
        self._resident_lock = threading.Lock()

    # ---- loading -------------------------------------------------------------------------------

    @staticmethod
    def _model_source(settings: Settings) -> str:
        if settings.uses_embedded_model:
            return str(embedded_model_path(settings.model_cache_dir))
        return settings.model_id

    def _load_pipeline(self, source: str):
        logger.info("loading %s on %s (%s)", source, self.device, self.dtype)
        # A local folder loads without network; a hub id goes through the normal hub download.
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            dtype=self.dtype,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=Path(source).is_dir(),
        )
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if self.settings.compile_unet and self.device == "cuda":
            # Weights are patched in place when adapters switch, which does not trigger recompilation.
            pipe.unet = torch.compile(pipe.unet, fullgraph=True)
        return pipe

    @property
    def model_name(self) -> str:
        return self.settings.model_id

    # ---- adapters ------------------------------------------------------------------------------

    def load_adapter(self, key: str, path: Path) -> LoraWeights:
        """Read a LoRA file and keep its factors resident on the device. Runs outside the generation lock."""
        weights = fit_layers(read_lora_file(path), self._targets, self.device, self.dtype)
        with self._resident_lock:
            self._resident[key] = weights
        return weights

    def remove_adapter(self, key: str) -> bool:
        """Forget a resident adapter. A request already holding it still finishes with it."""
        with self._resident_lock:
            return self._resident.pop(key, None) is not None

    def resident_adapters(self) -> list[str]:
        with self._resident_lock:
            return list(self._resident)

    # ---- generation ----------------------------------------------------------------------------

    def generate(
        self, spec: GenerationSpec, adapters: Sequence[ActiveAdapter] = (), output_type: str = "pil"
    ) -> GenerationResult:
        """Generate one image; `output_type="np"` gives the float image in 0..1 (for exact comparisons)."""
        with self._lock:
            # Inside the lock: the fast tokenizer's truncation setting is shared state the pipeline also sets.
            warnings = self._prompt_warnings(spec)
            t0 = time.perf_counter()
            self._activate(adapters)
            t1 = time.perf_counter()
            try:
                image = self._run_pipeline(spec, output_type)
            except torch.OutOfMemoryError as exc:
                self._release_memory()
                raise GenerationOutOfMemory(str(exc).splitlines()[0]) from exc
            t2 = time.perf_counter()
        return GenerationResult(image, (t1 - t0) * 1000, (t2 - t1) * 1000, warnings)

    def _run_pipeline(self, spec: GenerationSpec, output_type: str):
        # The generator lives on the CPU so that a seed gives the same image on every device.
        generator = torch.Generator("cpu").manual_seed(spec.seed)
        with torch.inference_mode():
            return self.pipe(
                prompt=spec.prompt,
                negative_prompt=spec.negative_prompt or None,
                width=spec.width,
                height=spec.height,
                num_inference_steps=spec.num_inference_steps,
                guidance_scale=spec.guidance_scale,
                generator=generator,
                output_type=output_type,
            ).images[0]

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

    def _activate(self, adapters: Sequence[ActiveAdapter]) -> None:
        """Make the weights equal base + the requested adapters, touching only what changes.

        Adapters are merged in key order so that the order of a request's list cannot change the bits.
        Weight-0 adapters are left out: W + 0 * delta is W.
        """
        wanted = sorted((a for a in adapters if a.weight != 0.0), key=lambda a: a.key)
        signature = tuple((a.key, a.weights, a.weight) for a in wanted)
        if len(signature) == len(self._merged_set) and all(
            k1 == k2 and w1 is w2 and x1 == x2
            for (k1, w1, x1), (k2, w2, x2) in zip(signature, self._merged_set, strict=True)
        ):
            return
        plan: dict[tuple[str, str], list[tuple[LoraLayer, float]]] = {}
        for adapter in wanted:
            for layer in adapter.weights.layers:
                plan.setdefault((layer.component, layer.module), []).append((layer, adapter.weight))
        with torch.no_grad():
            # Only modules the new set leaves alone need their pristine weights back: the merge below
            # overwrites the others completely, so restoring them first would be a wasted copy.
            self._merged_set = ()  # if a merge fails half-way, the next request redoes it
            for target in self._merged_modules - plan.keys():
                self._restore(target)
            self._merged_modules &= plan.keys()
            for target, layers in plan.items():
                self._merge(target, layers)
                self._merged_modules.add(target)
        self._merged_set = signature

    def _merge(self, target: tuple[str, str], layers: list[tuple[LoraLayer, float]]) -> None:
        """weight = weight0 + sum(w * scale * up @ down), written straight into the module's weight.

        Switching cost on CPU is per-op overhead, not arithmetic (the products are small), so the common
        case is one fused `addmm` per layer into the weight's own storage: no temporaries, no restore
        copy, no host sync. A float32 model accumulates in float32 (one rounding per adapter; the
        earlier float64 merge cost 3x the time for no measurable pixel difference against diffusers).
        On a float16 GPU, one adapter is still one `addmm` (cuBLAS accumulates in float32 and rounds
        once); several adapters on one layer are summed in a float32 buffer and rounded once.
        """
        weight, weight0, bias, bias0 = self._views(target)
        if len(layers) == 1 or weight.dtype == torch.float32:
            out = weight
            first = weight0
        else:
            out = weight0.to(torch.float32)
            first = out
        for i, (layer, adapter_weight) in enumerate(layers):
            up, down = layer.up, layer.down
            if out.dtype != up.dtype:
                up, down = up.to(out.dtype), down.to(out.dtype)
            alpha = layer.scale * adapter_weight
            if i == 0 and out is weight:
                torch.addmm(first, up, down, alpha=alpha, out=out)
            else:
                out.addmm_(up, down, alpha=alpha)
        if out is not weight:
            weight.copy_(out)
        bias_layers = [(layer, w) for layer, w in layers if layer.up_bias is not None]
        if bias is not None and bias_layers:
            total = bias0.to(torch.float32)
            for layer, adapter_weight in bias_layers:
                total.add_(layer.up_bias.to(torch.float32), alpha=layer.scale * adapter_weight)
            bias.copy_(total)
            self._merged_biases.add(target)
        elif target in self._merged_biases:  # the previous set changed this bias, the new one does not
            bias.copy_(bias0)
            self._merged_biases.discard(target)

    def _views(self, target: tuple[str, str]):
        """(weight, pristine weight, bias, pristine bias) of a module, weights as 2-D (out, in*kh*kw) views.

        The pristine copy is taken the first time a module is merged; the views share storage with the
        module's parameters, so writing into them changes the model without a `.to()` or reallocation.
        """
        views = self._pristine.get(target)
        if views is None:
            module = self._targets[target]
            weight = module.weight.detach()
            bias = None if module.bias is None else module.bias.detach()
            rows = weight.shape[0]
            views = (
                weight.view(rows, -1),
                weight.clone().view(rows, -1),
                bias,
                None if bias is None else bias.clone(),
            )
            self._pristine[target] = views
        return views

    def _restore(self, target: tuple[str, str]) -> None:
        weight, weight0, bias, bias0 = self._pristine[target]
        weight.copy_(weight0)
        if target in self._merged_biases:
            bias.copy_(bias0)
            self._merged_biases.discard(target)

    def _restore_base(self) -> None:
        for target in self._merged_modules:
            self._restore(target)
        self._merged_modules.clear()
        self._merged_set = ()

    def restore_base(self) -> None:
        """Put the pristine base weights back (used when the adapter cache is cleared)."""
        with self._lock, torch.no_grad():
            self._restore_base()

    def _release_memory(self) -> None:
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def memory_stats(self) -> dict[str, int]:
        if self.device != "cuda":
            return {}
        return {
            "gpu_allocated_bytes": torch.cuda.memory_allocated(),
            "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        }
