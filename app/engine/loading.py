"""Loading the diffusers pipeline: device and dtype, the embedded model, a local folder or a hub id.

The same code serves the embedded test model, a real SD 1.5 folder and a hub id: only MODEL_ID
changes. In float16 the `fp16` variant is loaded where the repo has one (half the download).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from app.config import Settings
from app.engine.embedded import embedded_model_path

logger = logging.getLogger(__name__)

# One load at a time per process: diffusers/accelerate patch torch globally while building models on
# the meta device, so a second load in another thread could get empty weights.
_MODEL_LOAD_LOCK = threading.Lock()


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


def model_source(settings: Settings) -> str:
    """The folder or hub id to load: the embedded model is built (once) into the model cache."""
    if settings.uses_embedded_model:
        return str(embedded_model_path(settings.model_cache_dir))
    return settings.model_id


def load_pipeline(settings: Settings, device: str, dtype: torch.dtype) -> tuple[StableDiffusionPipeline, str]:
    """(pipeline on the device, the source it came from)."""
    with _MODEL_LOAD_LOCK:
        source = model_source(settings)
        logger.info("loading %s on %s (%s)", source, device, dtype)
        pipe = _from_pretrained(source, dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if settings.compile_unet:
        # Compiled kernels go to the model cache (a volume in the container), so a restart reuses them
        # instead of compiling again. Written before the first compile; an operator's own setting wins.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(settings.model_cache_dir) / "torch-compile"))
        # Adapter switches write merged weights into the parameters' own storage, which neither
        # recompiles nor invalidates captured CUDA graphs.
        mode = None if settings.compile_mode == "default" else settings.compile_mode
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    return pipe, source


def _from_pretrained(source: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    # A local folder loads without network; a hub id goes through the normal hub download (HF_TOKEN,
    # HF_HUB_OFFLINE and the HF cache apply).
    local = Path(source).is_dir()
    kwargs = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=local)
    if dtype == torch.float16:
        try:
            return StableDiffusionPipeline.from_pretrained(source, variant="fp16", **kwargs)
        except (OSError, ValueError) as exc:  # the repo or folder has no fp16 files: load the full ones
            logger.info("no fp16 variant of %s (%s); loading the float32 files", source, str(exc).splitlines()[0])
    return StableDiffusionPipeline.from_pretrained(source, **kwargs)
