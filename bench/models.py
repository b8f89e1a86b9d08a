"""Model presets: the embedded tiny model, and the full SD 1.5 architecture with random weights.

`sd15-random` times exactly like the real model (same configs, same shapes), without a hub download:
it is built once from SD 1.5's published configs, saved as a diffusers folder, and loaded through
MODEL_ID=<folder> like any local SD 1.5 checkout.
"""

from __future__ import annotations

from pathlib import Path

from app.config import EMBEDDED_MODEL_ID
from app.engine.embedded import (
    SD15_TEXT_ENCODER_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    build_sd15_pipeline,
    saved_model_path,
)

PRESETS = ("tiny", "sd15-random")
SD15_RANDOM_VERSION = "2"  # bump when the configs or seeding change


def model_id_for(preset: str, cache_dir: Path) -> str:
    """The MODEL_ID that selects a preset (building the sd15-random folder the first time)."""
    if preset == "tiny":
        return EMBEDDED_MODEL_ID
    if preset == "sd15-random":
        return str(sd15_random_path(cache_dir))
    raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")


def sd15_random_path(cache_dir: Path) -> Path:
    return saved_model_path(Path(cache_dir) / f"sd15-random-v{SD15_RANDOM_VERSION}", build_sd15_random)


def build_sd15_random(seed: int = 0):
    """SD 1.5's architecture with seeded random weights (float32; the engine casts on load)."""
    return build_sd15_pipeline(SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_ENCODER_CONFIG, seed=seed)
