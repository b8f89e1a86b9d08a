"""Model presets: the embedded tiny model, and the full SD 1.5 architecture with random weights.

`sd15-random` times exactly like the real model (same configs, same shapes), without a hub download:
it is built once from SD 1.5's published configs, saved as a diffusers folder, and loaded through
MODEL_ID=<folder> like any local SD 1.5 checkout.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from app.config import EMBEDDED_MODEL_ID
from app.engine.embedded import SCHEDULER_CONFIG, build_clip_tokenizer

PRESETS = ("tiny", "sd15-random")
SD15_RANDOM_VERSION = "1"  # bump when the configs below change

# runwayml/stable-diffusion-v1-5 unet/config.json, vae/config.json, text_encoder/config.json.
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT_ENCODER_CONFIG = dict(  # CLIP ViT-L/14 text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)


def model_id_for(preset: str, cache_dir: Path) -> str:
    """The MODEL_ID that selects a preset (building the sd15-random folder the first time)."""
    if preset == "tiny":
        return EMBEDDED_MODEL_ID
    if preset == "sd15-random":
        return str(sd15_random_path(cache_dir))
    raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")


def sd15_random_path(cache_dir: Path) -> Path:
    target = Path(cache_dir) / f"sd15-random-v{SD15_RANDOM_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_sd15_random().save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_sd15_random(seed: int = 0):
    """SD 1.5's architecture with seeded random weights (float32; the engine casts on load)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    vae = AutoencoderKL(**SD15_VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd15_parameter_counts() -> dict[str, int]:
    """Parameter counts of the sd15-random components, built on the meta device (no memory, instant)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**SD15_UNET_CONFIG),
            "vae": AutoencoderKL(**SD15_VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG)),
        }
    return {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
