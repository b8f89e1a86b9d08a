"""The embedded model: a tiny pipeline with the Stable Diffusion 1.5 architecture and random weights.

The workplace has no model hub, so tests, the quickstart and CI run on this model. It is built from
configs with fixed seeds, saved once as an ordinary diffusers folder, and then loaded with
`StableDiffusionPipeline.from_pretrained` like any real SD 1.5 folder. Its images are noise.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

# Bump when the configs below change, so that an old saved folder is not reused.
EMBEDDED_MODEL_VERSION = "1"
SEED = 1234

# The real SD 1.5 shapes (stable-diffusion-v1-5's unet/, vae/ and text_encoder/ config.json).
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
# Four blocks -> three 2x downsamples -> the SD 1.5 latent factor of 8.
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

# The embedded model: the same block layout, shrunk in width and depth (channel counts divide by the
# 32 norm groups), so every code path of the real model runs in a fraction of a second on a CPU.
UNET_CONFIG = {**SD15_UNET_CONFIG, "block_out_channels": (32, 64, 64, 64), "layers_per_block": 1,
               "cross_attention_dim": 64}  # fmt: skip
VAE_CONFIG = {**SD15_VAE_CONFIG, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1}
TEXT_ENCODER_CONFIG = {**SD15_TEXT_ENCODER_CONFIG, "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 64}  # fmt: skip
# The scheduler config SD 1.5 ships (PNDM).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


def embedded_model_path(cache_dir: Path) -> Path:
    """Return the folder of the embedded model, building it the first time."""
    return saved_model_path(Path(cache_dir) / f"tiny-sd15-v{EMBEDDED_MODEL_VERSION}", build_embedded_pipeline)


def saved_model_path(target: Path, build) -> Path:
    """`target` as a saved diffusers folder, made with `build()` the first time."""
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename, so concurrent starts never see a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build().save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built %s", target)
    return target


def build_embedded_pipeline():
    """Build the tiny SD-1.5-architecture pipeline in memory, deterministically."""
    return build_sd15_pipeline(UNET_CONFIG, VAE_CONFIG, TEXT_ENCODER_CONFIG, seed=SEED)


def build_sd15_pipeline(unet_config: dict, vae_config: dict, text_encoder_config: dict, seed: int):
    """An SD 1.5 pipeline with these configs and seeded random weights (float32)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config))
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


def build_clip_tokenizer():
    """A CLIPTokenizer with the real 49,408-token CLIP vocabulary, made without the hub."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split()) for m in merges],
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of OpenAI's CLIP BPE, derived the way CLIP's own tokenizer derives them.

    The BPE merge list ships inside the `open-clip-torch` package; it is read as a plain file, without
    importing open_clip (whose dependencies we do not install). Without it, a byte-level vocabulary
    of the same size keeps the model working, with worse tokenisation.
    """
    byte_chars = list(_bytes_to_unicode().values())
    merges: list[str] = []
    bpe_file = _open_clip_bpe_file()
    if bpe_file is not None:
        lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
        merges = lines[1 : 49152 - 256 - 2 + 1]
    else:
        logger.warning(
            "open-clip-torch is not installed: the embedded model uses a byte-level CLIP vocabulary "
            "(install it with `pip install --no-deps open-clip-torch` for the real one)"
        )
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    # Pad a byte-level fallback to the real vocabulary size so the special token ids stay 49406/49407.
    filler = [f"<|unused{i}|>" for i in range(49408 - len(tokens) - len(specials))]
    vocab = {token: i for i, token in enumerate(tokens + filler + specials)}
    return vocab, merges


def _open_clip_bpe_file() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))
