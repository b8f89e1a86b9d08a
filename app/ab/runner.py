"""Runs an A/B test through the generation service: the LoRAs of all variants are acquired once, then
each variant x seed is one job, rendered exactly as `/generate` renders it.

Why one job per image and not one batched pipeline call: the engine merges adapter deltas into the
weights, so two variants with different weights are two different models and cannot share a
denoising pass; all seeds of a variant run back to back (one merge per variant).

A test holds at most one place in the queue: the next job's place is taken only when the previous
one is done, so other users' requests interleave between its variants instead of waiting for the
whole sweep. Mid-test a full queue means waiting for a place, not failing work already done.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from app.ab.plan import AbPlan, Variant
from app.jobs import AppliedLora, GenerationSpec
from app.service import Disconnected, GenerationOutcome, GenerationService


@dataclass
class VariantOutcome:
    variant: Variant
    applied: list[AppliedLora]
    warnings: list[str]
    images: list[GenerationOutcome]  # one per seed, in the plan's seed order


@dataclass
class AbOutcome:
    variants: list[VariantOutcome]
    lora_load_ms: float
    total_ms: float


async def run_ab_test(
    service: GenerationService,
    plan: AbPlan,
    settings: GenerationSpec,
    strict: bool = False,
    disconnected: Disconnected = None,
) -> AbOutcome:
    """Generate every variant x seed of `plan` with `settings` (its seed is replaced by each plan seed)."""
    start = time.perf_counter()
    acquired = await service.acquire(plan.union(), strict, images=len(plan.variants) * len(plan.seeds))  # 1st place
    reserved = True
    outcomes: list[VariantOutcome] = []
    try:
        for variant in plan.variants:
            images: list[GenerationOutcome] = []
            for seed in plan.seeds:
                if not reserved:
                    await service.queue.wait_for_place(disconnected)
                reserved = False  # the job owns the place from here, and gives it back if it never starts
                spec = dataclasses.replace(settings, seed=seed)
                images.append(await service.render(spec, acquired, variant.loras, disconnected))
            warnings: list[str] = []
            for image in images:
                warnings += [w for w in image.warnings if w not in warnings]
            outcomes.append(VariantOutcome(variant, images[0].loras, warnings, images))
    finally:
        if reserved:
            service.queue.release_reservation()
    return AbOutcome(outcomes, acquired.load_ms, (time.perf_counter() - start) * 1000)
