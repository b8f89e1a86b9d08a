"""AUTOMATIC1111-style LoRA tags in a prompt: `<lora:NAME:WEIGHT>` and `<lora:NAME>` (weight 1.0).

NAME is a brand id, optionally with a version: `acme`, `globex@v2`. WEIGHT is a number 0..1. The
tags are taken out of the prompt before it is encoded; the LoRAs they name join the request's LoRA
set (`brand_id`, `lora_configs`) under the same rules.

Whitespace: each tag is removed together with the spaces and tabs around it and replaced by one
space; then spaces left at the start or end of a line, and at both ends of the prompt, are dropped.
Nothing else changes (commas stay as typed, as in A1111). So `"a cup <lora:acme:0.5> on a table"`
becomes `"a cup on a table"`, `"<lora:acme> a cup"` becomes `"a cup"`. (CLIP's tokenizer collapses
whitespace anyway, so this only decides what the clean prompt looks like, not the image.)

Only `<lora:...>` is a tag; other `<...>` text is left alone. Torch-free.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from app.lora.registry import ID_PATTERN, VERSION_PATTERN

# `<lora:` up to the next `>`; a `<` inside means an unclosed tag and is left for the error check.
TAG = re.compile(r"[ \t]*<lora:([^<>]*)>[ \t]*")
UNCLOSED = re.compile(r"<lora:[^>]*$|<lora:[^>]*<")
DEFAULT_TAG_WEIGHT = 1.0


class InvalidPromptTag(ValueError):
    """A `<lora:...>` tag that cannot be used; the message quotes it and says what is allowed."""

    field = "prompt"

    def __init__(self, tag: str, reason: str):
        super().__init__(f"prompt tag {tag!r}: {reason}")
        self.tag = tag


@dataclass(frozen=True)
class PromptLora:
    brand_id: str
    version: str | None
    weight: float
    tag: str  # as written, e.g. "<lora:acme:0.5>"


def parse_prompt_tags(prompt: str) -> tuple[str, list[PromptLora]]:
    """(the prompt without its tags, the LoRAs the tags name, in prompt order)."""
    loras: list[PromptLora] = []

    def take(match: re.Match) -> str:
        loras.append(_parse_tag(match.group(0).strip(), match.group(1)))
        return " "

    if "<lora:" not in prompt:
        return prompt, []
    unclosed = UNCLOSED.search(prompt)
    if unclosed:
        raise InvalidPromptTag(unclosed.group(0).rstrip("<")[:80], "the tag is not closed with '>'")
    cleaned = TAG.sub(take, prompt)
    cleaned = re.sub(r"[ \t]+(?=\n)|(?<=\n)[ \t]+", "", cleaned).strip()
    return cleaned, loras


def _parse_tag(tag: str, body: str) -> PromptLora:
    parts = body.split(":")
    if len(parts) > 2:
        raise InvalidPromptTag(tag, "write <lora:NAME> or <lora:NAME:WEIGHT> (one weight, 0 to 1)")
    name = parts[0].strip()
    brand_id, _, version = name.partition("@")
    if not ID_PATTERN.fullmatch(brand_id) or ".." in brand_id:
        raise InvalidPromptTag(
            tag,
            f"NAME must be a brand id ({ID_PATTERN.pattern}, no '..'), optionally with @vN for a version",
        )
    if "@" in name and not VERSION_PATTERN.fullmatch(version):
        raise InvalidPromptTag(tag, f"version {version!r} is not valid: write NAME@v1, NAME@v2, ...")
    weight = DEFAULT_TAG_WEIGHT
    if len(parts) == 2:
        text = parts[1].strip()
        try:
            weight = float(text)
        except ValueError:
            raise InvalidPromptTag(tag, f"weight {text!r} is not a number; use a number from 0 to 1") from None
        if not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
            raise InvalidPromptTag(tag, f"weight {text} is outside 0 to 1")
    return PromptLora(brand_id, version or None, weight, tag)
