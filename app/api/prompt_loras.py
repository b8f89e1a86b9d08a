"""prompt tags (`<lora:NAME:WEIGHT>`, app/prompt_tags.py) as LoRA specs for the routes.

The tags join the request's LoRA set under the same rules as `brand_id` / `lora_configs`: each LoRA
once (a duplicate is a 422 quoting the tag), a missing brand falls back with a warning.
"""

from __future__ import annotations

import dataclasses

from app.ab.plan import AbPlan
from app.errors import InvalidRequest
from app.jobs import LoraSpec
from app.prompt_tags import InvalidPromptTag, PromptLora, parse_prompt_tags


def parse_prompt(prompt: str) -> tuple[str, list[PromptLora]]:
    """(prompt without tags, tags); a bad tag is a 422 on `prompt` that quotes it."""
    try:
        return parse_prompt_tags(prompt)
    except InvalidPromptTag as exc:
        raise InvalidRequest("prompt", str(exc)) from None


def tag_specs(prompt: str) -> list[LoraSpec]:
    return [LoraSpec(t.brand_id, t.weight, t.version, None) for t in parse_prompt(prompt)[1]]


def check_tag_duplicates(prompt: str, others: list[LoraSpec]) -> list[LoraSpec]:
    """The tags' specs, refused when a tag names a LoRA that `others` (or another tag) already has."""
    _, tags = parse_prompt(prompt)
    seen = {(s.brand_id, s.version) for s in others}
    for tag in tags:
        key = (tag.brand_id, tag.version)
        if key in seen:
            raise InvalidRequest(
                "prompt",
                f"LoRA {tag.brand_id!r} of prompt tag {tag.tag!r} is already in the request "
                "(brand_id, lora_configs or another tag); give each LoRA once",
            )
        seen.add(key)
    return [LoraSpec(t.brand_id, t.weight, t.version, None) for t in tags]


def plan_with_tags(plan: AbPlan, prompt: str) -> AbPlan:
    """An A/B plan whose every variant also carries the prompt's tag LoRAs (at the tags' weights)."""
    variants = []
    for variant in plan.variants:
        extra = check_tag_duplicates(prompt, list(variant.loras))
        variants.append(dataclasses.replace(variant, loras=variant.loras + tuple(extra)))
    return dataclasses.replace(plan, variants=variants)
