"""AUTOMATIC1111's "infotext": the generation parameters written into every PNG as a `parameters` text chunk.

Civitai, A1111's "PNG Info" tab and most image tools read it. The layout (as A1111 writes it):

    a red coffee cup <lora:acme:0.8>
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: tiny, Lora hashes: "acme: 0123456789"

The prompt is the one the client sent (prompt tags included); the negative prompt line is left out
when there is none; `Lora hashes` (brand id: first 10 hex digits of the file's sha256) is left out
when no LoRA was applied (a LoRA at weight 0 does not count: its image is the base image). An image
edit adds `Denoising strength` (and, inpainting, `Mask blur`) before it.
Values holding ',', ':' or a newline are JSON-quoted, as A1111 does.
Torch-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from app.jobs import EditSpec
from app.samplers import display_name

PNG_TEXT_KEY = "parameters"
LORA_HASH_DIGITS = 10


def quote(value: object) -> str:
    """A1111's `quote`: JSON-quote a value that holds ',', ':' or a newline; others stay as they are."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def model_name(model_id: str) -> str:
    """What `Model:` shows: a local folder's basename; a hub id or `tiny` as it is."""
    stripped = model_id.rstrip("/\\")
    if stripped and (os.path.isabs(stripped) or stripped.startswith(".") or Path(stripped).is_dir()):
        return os.path.basename(stripped) or stripped
    return model_id


def lora_hashes(loras: Iterable[tuple[str, str]]) -> str:
    """'acme: 0123456789, globex: abcdef0123' from (brand id, full sha256) pairs."""
    return ", ".join(f"{name}: {sha256[:LORA_HASH_DIGITS]}" for name, sha256 in loras)


def build_infotext(
    *,
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    scheduler: str,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    model_id: str,
    loras: Sequence[tuple[str, str]] = (),
    edit: EditSpec | None = None,
) -> str:
    fields = [
        ("Steps", steps),
        ("Sampler", display_name(scheduler)),
        ("CFG scale", f"{guidance_scale:g}"),
        ("Seed", seed),
        ("Size", f"{width}x{height}"),
        ("Model", model_name(model_id)),
    ]
    if edit is not None:  # A1111's names and order for img2img and inpainting
        fields.append(("Denoising strength", f"{edit.strength:g}"))
        if edit.mask is not None:
            fields.append(("Mask blur", edit.mask_blur))
            if edit.only_masked_padding is not None:
                fields += [("Inpaint area", "Only masked"), ("Masked area padding", edit.only_masked_padding)]
    if loras:
        fields.append(("Lora hashes", lora_hashes(loras)))
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields))
    return "\n".join(lines)
