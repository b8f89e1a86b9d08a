"""AUTOMATIC1111's "infotext": the generation parameters written into every PNG as a `parameters` text chunk.

Civitai, A1111's "PNG Info" tab and most image tools read it. The layout (as A1111 writes it):

    a red coffee cup <lora:acme:0.8>
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: tiny, Lora hashes: "acme: 0123456789"

The prompt is the one the client sent (prompt tags included), followed by a `<lora:NAME:WEIGHT>` tag for
each LoRA the request gave outside the prompt (`brand_id`, `lora_configs`), so that the infotext alone
reproduces the image (`parse_infotext(...).generate_request()`); the negative prompt line is left out
when there is none; `Lora hashes` (brand id: first 10 hex digits of the file's sha256) is left out
when no LoRA was applied (a LoRA at weight 0 does not count: its image is the base image). An image
edit adds `Denoising strength` (and, inpainting, `Mask blur`) before it.
Values holding ',', ':' or a newline are JSON-quoted, as A1111 does.
Torch-free.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.jobs import EditSpec
from app.samplers import SAMPLER_DISPLAY_NAMES, display_name

PNG_TEXT_KEY = "parameters"
LORA_HASH_DIGITS = 10
NEGATIVE_PREFIX = "Negative prompt: "
# One `Key: value` of the last line: a JSON-quoted value, or text up to the next ','.
FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


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
        lines.append(f"{NEGATIVE_PREFIX}{negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields))
    return "\n".join(lines)


def lora_tag(name: str, weight: float) -> str:
    """`<lora:NAME:WEIGHT>` as A1111 writes it; the weight in the fewest digits that read back as the same float."""
    text = repr(float(weight))
    return f"<lora:{name}:{text[:-2] if text.endswith('.0') else text}>"


def prompt_with_lora_tags(prompt: str, tags: Sequence[tuple[str, float]]) -> str:
    """The client's prompt with a tag for each (name, weight) after it, space-separated: the tag parser takes
    a tag out together with the spaces around it, so the prompt read back is the prompt the model saw."""
    return " ".join([prompt, *(lora_tag(name, weight) for name, weight in tags)]) if tags else prompt


@dataclass(frozen=True)
class Infotext:
    """An infotext read back: the prompt (tags included), the negative prompt and the `Key: value` fields."""

    prompt: str
    negative_prompt: str | None
    fields: dict[str, str] = field(default_factory=dict)

    def generate_request(self) -> dict:
        """The `/generate` body that gives this image again (the LoRAs are the prompt's tags)."""
        width, _, height = self.fields["Size"].partition("x")
        samplers = {display: name for name, display in SAMPLER_DISPLAY_NAMES.items()}
        body = {
            "prompt": self.prompt,
            "width": int(width),
            "height": int(height),
            "num_inference_steps": int(self.fields["Steps"]),
            "guidance_scale": float(self.fields["CFG scale"]),
            "seed": int(self.fields["Seed"]),
            "scheduler": samplers[self.fields["Sampler"]],
        }
        if self.negative_prompt is not None:
            body["negative_prompt"] = self.negative_prompt
        return body


def parse_infotext(text: str) -> Infotext:
    """Read an infotext written by `build_infotext` (A1111's layout): prompt lines, an optional
    `Negative prompt:` part, and a last line of `Key: value` fields (JSON-quoted values unquoted)."""
    *head, last = text.split("\n")
    fields = {}
    for match in FIELD.finditer(last):
        key, value = match.group(1).strip(), match.group(2).strip()
        if not key:
            continue
        fields[key] = json.loads(value) if value.startswith('"') else value
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in head:
        if negative_lines is None and line.startswith(NEGATIVE_PREFIX):
            negative_lines = [line[len(NEGATIVE_PREFIX) :]]
        elif negative_lines is not None:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    negative = "\n".join(negative_lines) if negative_lines is not None else None
    return Infotext("\n".join(prompt_lines), negative, fields)
