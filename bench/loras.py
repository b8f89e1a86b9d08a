"""Benchmark LoRA files: real files in the formats people ship, at a chosen rank and set of targets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from app.lora.synthetic import random_lora_state_dict, target_layers, write_lora


@dataclass(frozen=True)
class LoraShape:
    rank: int = 8
    key_format: str = "peft"  # "peft" or "kohya"
    feed_forward: bool = True  # attention only, or attention + feed-forward
    text_encoder: bool = True
    dtype: str = "float16"  # what people ship (the factors are cast to the model's dtype on load)

    def describe(self) -> str:
        targets = "attn+ff" if self.feed_forward else "attn"
        return f"rank {self.rank}, {self.key_format}, {targets}{', +TE' if self.text_encoder else ''}, {self.dtype}"


def write_brands(root: Path, pipe, names: list[str], shape: LoraShape, seed: int = 0) -> list[str]:
    """One LoRA folder per brand under `root` (the registry layout: <brand>/style.safetensors)."""
    layers = target_layers(
        pipe.unet, pipe.text_encoder, feed_forward=shape.feed_forward, with_text_encoder=shape.text_encoder
    )
    for i, name in enumerate(names):
        path = Path(root) / name / "style.safetensors"
        if not path.is_file():
            sd = random_lora_state_dict(
                layers, rank=shape.rank, key_format=shape.key_format, seed=seed + i, dtype=getattr(torch, shape.dtype)
            )
            write_lora(path, sd)
    return names
