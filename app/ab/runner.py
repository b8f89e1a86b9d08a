"""Runs an A/B test: the LoRAs of all variants are acquired once, then each variant is one queued job.

Adapters are loaded once for the whole test (one `acquire` for the union of its LoRAs) and each variant
re-weights them with `dataclasses.replace`, so a 16-variant sweep reads each file at most once.

Why one job per image and not one batched pipeline call: the engine merges adapter deltas into the
weights, so two variants with different weights are two different models and cannot share a
denoising pass. Only several seeds of one variant could be batched, and a batched call is not
guaranteed to give the same bits as `/generate` (batch-size dependent kernels), which would break the
promise that a variant's image equals `/generate`'s. So every image is its own job, and all seeds of
a variant run back to back (one merge per variant).

Each job goes through the generation queue on its own, reserved only when the previous one is done,
so a test holds at most one place in the queue and other users' requests interleave between its
variants instead of waiting for the whole sweep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from app.ab.plan import AbPlan, Variant
from app.engine.pipeline import ActiveAdapter, GenerationSpec
from app.lora.manager import AcquiredLoras, AppliedLora, LoraSpec
from app.queueing import ClientGone, QueueFull, QueueTimeout
from app.service import GenerationService, encode_png

RESERVE_POLL_S = 0.05


@dataclass
class VariantImage:
    seed: int
    png: bytes
    image: object  # PIL.Image.Image, for the contact sheet
    queue_ms: float
    lora_ms: float
    generation_ms: float
    total_ms: float


@dataclass
class VariantOutcome:
    variant: Variant
    applied: list[AppliedLora]
    warnings: list[str]
    images: list[VariantImage]  # one per seed, in the plan's seed order


@dataclass
class AbOutcome:
    variants: list[VariantOutcome]
    lora_load_ms: float
    total_ms: float


@dataclass(frozen=True)
class _Resolved:
    """What one (brand, version) of the union became: an adapter, or the warning why not."""

    adapter: ActiveAdapter | None
    applied: AppliedLora | None
    warning: str | None


async def run_ab_test(
    service: GenerationService,
    plan: AbPlan,
    settings: GenerationSpec,
    strict: bool = False,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> AbOutcome:
    """Generate every variant x seed of `plan` with `settings` (its seed is replaced by each plan seed)."""
    start = time.perf_counter()
    queue = service.queue
    queue.reserve()  # refuse at once (429), before any file work, when the queue is already full
    try:
        union = plan.union()
        acquired = await run_in_threadpool(service.loras.acquire, union, strict)
        resolved = await run_in_threadpool(_match_union, service, union, acquired)
    except BaseException:
        queue.release_reservation()
        raise
    outcomes: list[VariantOutcome] = []
    encodings: list[asyncio.Future] = []
    reserved = True
    try:
        for variant in plan.variants:
            adapters, applied, warnings = _variant_adapters(variant, resolved)
            images: list[VariantImage] = []
            for seed in plan.seeds:
                if not reserved:
                    await _reserve(service, disconnected)
                reserved = False  # run() owns the place from here, and gives it back if the job never starts
                spec = dataclasses.replace(settings, seed=seed)
                job_start = time.perf_counter()
                job = lambda s=spec, a=adapters: service.engine.generate(s, a)  # noqa: E731
                result, queue_ms = await queue.run(job, disconnected)
                image = VariantImage(seed, b"", result.image, queue_ms, result.lora_ms, result.generation_ms, 0.0)
                # Encode while the worker already runs the next variant.
                encodings.append(asyncio.ensure_future(_encode(image, job_start)))
                images.append(image)
                for warning in result.warnings:
                    if warning not in warnings:
                        warnings.append(warning)
            outcomes.append(VariantOutcome(variant, applied, warnings, images))
        await asyncio.gather(*encodings)
    finally:
        if reserved:
            queue.release_reservation()
        for pending in encodings:
            pending.cancel()
        service.loras.release(acquired)
    return AbOutcome(outcomes, acquired.load_ms, (time.perf_counter() - start) * 1000)


async def _encode(image: VariantImage, job_start: float) -> None:
    image.png = await run_in_threadpool(encode_png, image.image)
    image.total_ms = (time.perf_counter() - job_start) * 1000


async def _reserve(service: GenerationService, disconnected) -> None:
    """A place for the test's next job. Mid-test a full queue means waiting, not failing work already done."""
    deadline = time.perf_counter() + service.queue.timeout_s
    while True:
        try:
            service.queue.reserve()
            return
        except QueueFull:
            if disconnected is not None and await disconnected():
                raise ClientGone() from None
            if time.perf_counter() > deadline:
                raise QueueTimeout(
                    f"the A/B test waited more than {service.queue.timeout_s:g} s for a place in the queue"
                ) from None
            await asyncio.sleep(RESERVE_POLL_S)


def _match_union(
    service: GenerationService, union: list[LoraSpec], acquired: AcquiredLoras
) -> dict[tuple[str, str | None], _Resolved]:
    """Which adapter (or warning) each (brand, version) of the union became.

    `acquire` returns the adapters it could apply and one warning per LoRA it skipped, in request
    order, but does not say which is which; the file each spec resolves to tells them apart.
    """
    by_key = {a.key: (a, applied) for a, applied in zip(acquired.adapters, acquired.applied, strict=True)}
    registry = service.loras.registry
    skipped: list[tuple[str, str | None]] = []
    resolved: dict[tuple[str, str | None], _Resolved] = {}
    for spec in union:
        lora_file = registry.resolve(spec.brand_id, spec.version)
        hit = by_key.get(lora_file.key) if lora_file is not None else None
        if hit is not None:
            resolved[(spec.brand_id, spec.version)] = _Resolved(hit[0], hit[1], None)
        else:
            skipped.append((spec.brand_id, spec.version))
    exact = len(skipped) == len(acquired.warnings)
    for i, key in enumerate(skipped):
        warning = acquired.warnings[i] if exact else "; ".join(acquired.warnings) or f"LoRA {key[0]!r} not applied"
        resolved[key] = _Resolved(None, None, warning)
    return resolved


def _variant_adapters(
    variant: Variant, resolved: dict[tuple[str, str | None], _Resolved]
) -> tuple[list[ActiveAdapter], list[AppliedLora], list[str]]:
    """The shared adapters re-weighted for one variant (no file is read here)."""
    adapters, applied, warnings = [], [], []
    for spec in variant.loras:
        entry = resolved[(spec.brand_id, spec.version)]
        if entry.adapter is None:
            warnings.append(entry.warning)
            continue
        adapters.append(dataclasses.replace(entry.adapter, weight=spec.weight))
        applied.append(dataclasses.replace(entry.applied, weight=spec.weight, type=spec.type))
    return adapters, applied, warnings
