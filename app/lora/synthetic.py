"""Write real LoRA files for a given model, in the key formats people ship (PEFT/diffusers and kohya).

Used by the quickstart's demo brands, the tests and the benchmark. The factors are random but
seeded, and large enough that the effect on an image is visible.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
             "attn2.to_v", "attn2.to_out.0")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
PROJECTIONS = ("proj_in", "proj_out")
RESNET_CONVS = ("conv1", "conv2")
TEXT_ENCODER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def target_layers(
    unet: nn.Module,
    text_encoder: nn.Module | None,
    feed_forward: bool = True,
    convolutions: bool = False,
    with_text_encoder: bool = True,
) -> list[tuple[str, str, nn.Module]]:
    """(component, module name, module) of the layers a typical SD 1.5 LoRA trains."""
    suffixes = ATTENTION + PROJECTIONS + (FEED_FORWARD if feed_forward else ())
    picked = [
        ("unet", name, module)
        for name, module in unet.named_modules()
        if name.endswith(suffixes) and isinstance(module, (nn.Linear, nn.Conv2d))
    ]
    if convolutions:
        picked += [
            ("unet", name, module)
            for name, module in unet.named_modules()
            if ".resnets." in name and name.endswith(RESNET_CONVS) and isinstance(module, nn.Conv2d)
        ]
    if with_text_encoder and text_encoder is not None:
        picked += [
            ("text_encoder", name, module)
            for name, module in text_encoder.named_modules()
            if name.endswith(TEXT_ENCODER) and isinstance(module, nn.Linear)
        ]
    return picked


def random_lora_state_dict(
    layers: list[tuple[str, str, nn.Module]],
    rank: int = 4,
    alpha: float | None = None,
    key_format: str = "peft",
    seed: int = 0,
    strength: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A LoRA state dict over `layers`.

    `key_format` "peft": `unet.<module>.lora_A.weight` / `lora_B.weight` (what diffusers' training
    scripts save); "kohya": `lora_unet_<module_with_underscores>.lora_down.weight` / `lora_up.weight`
    / `alpha` (what kohya sd-scripts save). `alpha` is written for kohya (default: the rank).
    """
    if key_format not in ("peft", "kohya"):
        raise ValueError(f"unknown key format {key_format!r}; use 'peft' or 'kohya'")
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for component, name, module in layers:
        weight = module.weight
        fan_in = weight[0].numel()
        down_shape = (rank, *weight.shape[1:]) if isinstance(module, nn.Conv2d) else (rank, weight.shape[1])
        up_shape = (weight.shape[0], rank, 1, 1) if isinstance(module, nn.Conv2d) else (weight.shape[0], rank)
        # Scaled so that the delta is comparable to the layer's own weights: a visible change.
        down = torch.randn(down_shape, generator=generator) / fan_in**0.5
        up = torch.randn(up_shape, generator=generator) * strength * weight.detach().float().std().item()
        down, up = down.to(dtype).contiguous(), up.to(dtype).contiguous()
        if key_format == "peft":
            full = f"text_model.{name}" if component == "text_encoder" and not name.startswith("text_model.") else name
            state[f"{component}.{full}.lora_A.weight"] = down
            state[f"{component}.{full}.lora_B.weight"] = up
        else:
            prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
            base = prefix + name.removeprefix("text_model.").replace(".", "_")
            state[f"{base}.lora_down.weight"] = down
            state[f"{base}.lora_up.weight"] = up
            state[f"{base}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank), dtype=dtype)
    return state


def write_lora(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path), metadata=metadata)
    return path
