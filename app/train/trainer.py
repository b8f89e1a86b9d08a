"""Train a brand's LoRA on the service's own model and publish it as the brand's next version.

The objective is diffusers' (examples/text_to_image/train_text_to_image_lora.py): peft LoRA layers on
the UNet's attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`), optionally on the CLIP text
encoder's (`q_proj`, `k_proj`, `v_proj`, `out_proj`); VAE latents * scaling_factor, noised with a
DDPMScheduler built from the model's own scheduler config at a random timestep, and the MSE between
the UNet's prediction and the noise (or the velocity, for a v-prediction model). AdamW at a constant
learning rate, gradients clipped to norm 1.

Differences that do not change the objective: there is no augmentation (resize + center crop), so each
image's latent distribution is computed once and sampled every step (what `latent_dist.sample()`
does); frozen-text-encoder captions are encoded once. Every random draw of step `s` comes from a
generator seeded with (seed, s) and batches from a per-epoch permutation seeded with (seed, epoch), so
a run is reproducible and a resumed run continues exactly where the interrupted one stopped.

The result is written with diffusers' `save_lora_weights` (PEFT keys `unet.…lora_A.weight`, and the
LoraConfig in the header, so an alpha other than the rank keeps its scale), checked with the service's
loader against the model, and published through the upload code (app/lora/uploads.py): the new `vN`
folder gets `metadata.json` and `samples/` first and `style.safetensors` last, so it appears complete
or not at all.

`resume`: with `checkpoint_every` > 0 the run keeps a checkpoint in
`LORA_BASE_DIR/.checkpoints/BRAND/` (hidden: the registry never lists it): the LoRA weights, AdamW's
moments, the step and the losses so far; it is also written when the run is interrupted (Ctrl-C,
SIGTERM). `resume=True` continues from it when the dataset and the options (except `steps`) are the
same; a finished run removes it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from app.config import Settings
from app.engine.loading import load_pipeline, resolve_device, resolve_dtype
from app.engine.lora_weights import adaptable_modules, fit_layers, read_lora_file
from app.lora.registry import LoraRegistry, validate_lora_id
from app.lora.safetensors_header import read_lora_header
from app.lora.uploads import LoraUploads
from app.train.dataset import Dataset, load_dataset
from app.train.options import TrainOptions

logger = logging.getLogger(__name__)

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
CHECKPOINTS_DIR = ".checkpoints"  # under LORA_BASE_DIR; hidden, so never a brand
SAVED_WEIGHTS = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes
MAX_GRAD_NORM = 1.0
ENCODE_BATCH = 8


class TrainingError(RuntimeError):
    """A run that cannot start or continue (bad resume, model problem); the message says why."""


@dataclass(frozen=True)
class TrainResult:
    brand_id: str
    version: str
    file: Path
    metadata: dict
    steps: int
    seconds: float
    loss_first: float
    loss_last: float


ProgressFn = Callable[[int, int, float], None]  # (step, steps, loss)


def loss_window(steps: int) -> int:
    """How many steps `loss_first` / `loss_last` average (single-step losses depend on the random timestep)."""
    return max(1, min(50, steps // 10))


def train_lora(
    settings: Settings,
    brand_id: str,
    data_dir: Path | str,
    options: TrainOptions | None = None,
    *,
    resume: bool = False,
    samples: int = 2,
    sample_steps: int = 20,
    checkpoint_every: int = 0,
    progress: ProgressFn | None = None,
    show_progress: bool = False,
    max_images: int = 10_000,
) -> TrainResult:
    """Train and publish `LORA_BASE_DIR/brand_id/vN/style.safetensors`; see the module docstring."""
    options = options or TrainOptions()
    started = time.perf_counter()
    validate_lora_id(brand_id)
    registry = LoraRegistry(settings.lora_base_dir)
    registry.versions(brand_id)  # refuses a brand folder that leads outside the root, before any work
    dataset = load_dataset(data_dir, max_images=max_images)
    checkpoint = Checkpoint(registry.root / CHECKPOINTS_DIR / brand_id)
    state = checkpoint.load_for(options, dataset.sha256) if resume else None

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    pipe, _ = load_pipeline(settings.model_copy(update={"compile_unet": False}), device, dtype)
    run = _Run(pipe, dataset, options, device, dtype)
    start_step, losses, seconds_before = 0, [], 0.0
    if state is not None:
        start_step, losses, seconds_before = run.restore(state)
        logger.info("resuming %s at step %d of %d", brand_id, start_step, options.steps)

    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=options.steps, initial=start_step, desc=f"training {brand_id}", unit="step")
    step = start_step

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - started

    try:
        while step < options.steps:
            loss = run.step(step)
            losses.append(loss)
            step += 1
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                bar.update(1)
            if progress is not None:
                progress(step, options.steps, loss)
            if checkpoint_every and step % checkpoint_every == 0 and step < options.steps:
                checkpoint.save(run, options, dataset.sha256, step, losses, elapsed())
    except BaseException:
        if checkpoint_every and step > start_step:
            checkpoint.save(run, options, dataset.sha256, step, losses, elapsed())
            logger.warning("interrupted at step %d; `--resume` continues from %s", step, checkpoint.folder)
        raise
    finally:
        if bar is not None:
            bar.close()

    window = loss_window(options.steps)
    loss_first, loss_last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    seconds = elapsed()
    training = {
        "steps": options.steps,
        "learning_rate": options.learning_rate,
        "rank": options.rank,
        "alpha": options.lora_alpha,
        "resolution": options.resolution,
        "batch_size": options.batch_size,
        "seed": options.seed,
        "text_encoder": options.text_encoder,
        "images": len(dataset),
        "dataset_sha256": dataset.sha256,
        "base_model": settings.model_id,
        "loss_first": loss_first,
        "loss_last": loss_last,
        "loss_window": window,
        "seconds": round(seconds, 3),
        "resumed_from_step": start_step if state is not None else None,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
    }
    metadata = {
        "type": "style",
        "base_model": settings.model_id,
        "training_steps": options.steps,
        "created_by": "app.train",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "training": training,
    }
    result = run.publish(settings, registry, brand_id, metadata, samples, sample_steps)
    checkpoint.remove()
    return TrainResult(brand_id, result.version, registry.root / result.file, metadata, options.steps, seconds,
                       loss_first, loss_last)  # fmt: skip


class _Run:
    """The model with its LoRA layers, the data as latents and captions, the optimizer."""

    def __init__(self, pipe: StableDiffusionPipeline, dataset: Dataset, options: TrainOptions, device, dtype):
        self.pipe, self.dataset, self.options = pipe, dataset, options
        self.device, self.dtype = device, dtype
        self.unet, self.text_encoder, self.vae = pipe.unet, pipe.text_encoder, pipe.vae
        for model in (self.unet, self.text_encoder, self.vae):
            model.requires_grad_(False)
        # The plain layers, before peft wraps them: what a LoRA file is checked against when published.
        self.targets = adaptable_modules({"unet": self.unet, "text_encoder": self.text_encoder})
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.scaling_factor = self.vae.config.scaling_factor
        self.means, self.stds = self._encode_images()
        tokens = pipe.tokenizer([e.caption for e in dataset.examples], padding="max_length", truncation=True,
                                max_length=pipe.tokenizer.model_max_length, return_tensors="pt")  # fmt: skip
        self.input_ids = tokens.input_ids
        self.hidden = None
        if not options.text_encoder:
            with torch.no_grad():
                self.hidden = torch.cat([self.text_encoder(ids.to(device))[0] for ids in self.input_ids.split(16)])

        torch.manual_seed(options.seed)  # peft's gaussian init draws from the global generator
        config = dict(r=options.rank, lora_alpha=options.lora_alpha, init_lora_weights="gaussian")
        self.unet.add_adapter(LoraConfig(**config, target_modules=UNET_TARGETS))
        self.trained = [self.unet]
        if options.text_encoder:
            # peft directly: transformers 5's `add_adapter` asks for a newer peft than the service pins.
            te_config = LoraConfig(**config, target_modules=TEXT_ENCODER_TARGETS)
            inject_adapter_in_model(te_config, self.text_encoder, adapter_name="default")
            self.text_encoder.peft_config = {"default": te_config}
            self.trained.append(self.text_encoder)
        # Mixed precision: a float16 model keeps its trainable LoRA parameters in float32.
        cast_training_params(self.trained, dtype=torch.float32)
        self.params = [p for model in self.trained for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=options.learning_rate, betas=(0.9, 0.999),
                                           weight_decay=1e-2, eps=1e-8)  # fmt: skip
        self.mixed = device == "cuda" and dtype != torch.float32
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.mixed and dtype == torch.float16)
        self._perms: dict[int, torch.Tensor] = {}

    def _encode_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's VAE latent distribution (mean, std), float32 on the CPU."""
        size = self.options.resolution
        means, stds = [], []
        examples = list(self.dataset.examples)
        with torch.no_grad():
            for start in range(0, len(examples), ENCODE_BATCH):
                pixels = torch.stack([_image_tensor(e.path, size) for e in examples[start : start + ENCODE_BATCH]])
                dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
                means.append(dist.mean.float().cpu())
                stds.append(dist.std.float().cpu())
        return torch.cat(means), torch.cat(stds)

    def _batch(self, step: int) -> torch.Tensor:
        n, size = len(self.dataset), self.options.batch_size
        indices = []
        for position in range(step * size, (step + 1) * size):
            epoch = position // n
            if epoch not in self._perms:
                self._perms = {epoch: torch.randperm(n, generator=_generator(self.options.seed, epoch, salt=1))}
            indices.append(int(self._perms[epoch][position % n]))
        return torch.tensor(indices)

    def step(self, step: int) -> float:
        idx = self._batch(step)
        g = _generator(self.options.seed, step)
        latents = self.means[idx] + self.stds[idx] * torch.randn(self.means[idx].shape, generator=g)
        latents = latents * self.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        latents, noise, timesteps = latents.to(self.device), noise.to(self.device), timesteps.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        for model in self.trained:
            model.train()
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.mixed):
            if self.hidden is not None:
                hidden = self.hidden[idx.to(self.hidden.device)]
            else:
                hidden = self.text_encoder(self.input_ids[idx].to(self.device))[0]
            pred = self.unet(noisy.to(self.dtype), timesteps, hidden.to(self.dtype)).sample
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"the loss became {value} at step {step + 1}; lower the learning rate")
        return value

    # -- checkpoints ------------------------------------------------------------------------------

    def lora_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: get_peft_model_state_dict(model) for name, model in self._components()}

    def _components(self):
        yield "unet", self.unet
        if self.options.text_encoder:
            yield "text_encoder", self.text_encoder

    def restore(self, state: dict) -> tuple[int, list[float], float]:
        tensors = state["tensors"]
        for name, model in self._components():
            prefix = f"lora.{name}."
            sub = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(model, sub)
            if getattr(result, "unexpected_keys", None):
                raise TrainingError("the checkpoint does not fit this model; start without --resume")
        cast_training_params(self.trained, dtype=torch.float32)
        opt = {"state": {}, "param_groups": state["info"]["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, field = key.split(".", 2)
                opt["state"].setdefault(int(index), {})[field] = value
        self.optimizer.load_state_dict(opt)
        info = state["info"]
        return info["step"], list(info["losses"]), float(info["seconds"])

    # -- the result -------------------------------------------------------------------------------

    def publish(self, settings: Settings, registry: LoraRegistry, brand_id: str, metadata: dict,
                samples: int, sample_steps: int):  # fmt: skip
        staging = Path(tempfile.mkdtemp(prefix="lora-train-"))
        try:
            # PEFT keys (`unet.<module>.lora_A.weight`): what diffusers' loader and the service's read.
            layers = {f"{name}_lora_layers": state for name, state in self.lora_state().items()}
            adapter_metadata = {
                f"{name}_lora_adapter_metadata": model.peft_config["default"].to_dict()
                for name, model in self._components()
            }
            StableDiffusionPipeline.save_lora_weights(staging, **layers, **adapter_metadata, safe_serialization=True)
            extras = self._samples(staging, samples, sample_steps)
            max_bytes = settings.lora_max_file_mb * 1024 * 1024

            def check_loadable(path: Path) -> None:  # the service's own loader, against the plain layers
                header = read_lora_header(path, max_bytes)
                layers, sha256, _ = read_lora_file(path, header)
                fit_layers(layers, self.targets, "cpu", torch.float32, sha256)

            uploads = LoraUploads(registry, max_bytes, check_loadable)
            pending = uploads.begin(brand_id)
            try:
                with open(staging / SAVED_WEIGHTS, "rb") as f:
                    while chunk := f.read(1024 * 1024):
                        pending.write(chunk)
            except BaseException:
                pending.abort()
                raise
            return uploads.finish(brand_id, pending, None, metadata, extras)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _samples(self, staging: Path, count: int, steps: int) -> dict[str, Path]:
        """`samples/seed-N.png`: the first captions, seeds 0..count-1, with the LoRA at full weight."""
        extras = {}
        if count <= 0:
            return extras
        for model in self.trained:
            model.eval()
        (staging / "samples").mkdir()
        size = self.options.resolution
        for seed in range(count):
            caption = self.dataset.examples[seed % len(self.dataset)].caption
            with torch.inference_mode():
                image = self.pipe(prompt=caption, width=size, height=size, num_inference_steps=steps,
                                  generator=torch.Generator("cpu").manual_seed(seed)).images[0]  # fmt: skip
            name = f"samples/seed-{seed}.png"
            image.save(staging / name)
            extras[name] = staging / name
        (staging / "samples" / "prompts.json").write_text(json.dumps(
            {f"seed-{s}.png": self.dataset.examples[s % len(self.dataset)].caption for s in range(count)}, indent=2))
        extras["samples/prompts.json"] = staging / "samples" / "prompts.json"
        return extras


class Checkpoint:
    """`LORA_BASE_DIR/.checkpoints/BRAND/`: state.safetensors (LoRA + AdamW tensors) and state.json."""

    RESUMABLE = ("rank", "alpha", "learning_rate", "resolution", "batch_size", "seed", "text_encoder")

    def __init__(self, folder: Path):
        self.folder = folder

    def save(self, run: _Run, options: TrainOptions, dataset_sha256: str, step: int, losses: list[float],
             seconds: float) -> None:  # fmt: skip
        tensors = {f"lora.{name}.{k}": v.detach().float().cpu().contiguous()
                   for name, state in run.lora_state().items() for k, v in state.items()}  # fmt: skip
        opt = run.optimizer.state_dict()
        for index, entries in opt["state"].items():
            for field, value in entries.items():
                tensors[f"adam.{index}.{field}"] = torch.as_tensor(value).detach().cpu().contiguous()
        info = {"step": step, "options": options.model_dump(), "dataset_sha256": dataset_sha256,
                "losses": losses, "seconds": seconds, "param_groups": opt["param_groups"]}  # fmt: skip
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}-", dir=self.folder.parent))
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(info))
        old = self.folder.with_name(f".{self.folder.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        if self.folder.exists():
            os.rename(self.folder, old)
        os.rename(tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)

    def load_for(self, options: TrainOptions, dataset_sha256: str) -> dict:
        info_file = self.folder / "state.json"
        if not info_file.is_file():
            raise TrainingError(f"nothing to resume: no checkpoint in {self.folder} (a run keeps one only with "
                                "--checkpoint-every > 0, and removes it when it finishes)")  # fmt: skip
        info = json.loads(info_file.read_text())
        if info["dataset_sha256"] != dataset_sha256:
            raise TrainingError("the checkpoint was made on other data (dataset_sha256 differs); "
                                "resume with the same dataset or start without --resume")  # fmt: skip
        changed = [k for k in self.RESUMABLE if info["options"].get(k) != options.model_dump()[k]]
        if changed:
            was = ", ".join(f"{k}={info['options'].get(k)!r}" for k in changed)
            raise TrainingError(f"the checkpoint was made with {was}; resume with the same options (only --steps "
                                "may change)")  # fmt: skip
        if info["step"] >= options.steps:
            raise TrainingError(f"the checkpoint is at step {info['step']}; give --steps above it to continue")
        return {"info": info, "tensors": load_file(str(self.folder / "state.safetensors"))}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()  # only when no other brand has one
        except OSError:
            pass


def _generator(seed: int, index: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 2 + salt) % (2**63))


def _image_tensor(path: Path, size: int) -> torch.Tensor:
    """RGB, resized so the short side is `size` and center-cropped (diffusers' default), in [-1, 1]."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        image = ImageOps.fit(image, (size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
