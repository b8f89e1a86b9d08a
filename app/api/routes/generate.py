"""POST /generate."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.deps import ServiceDep
from app.api.schemas import AppliedLoraPublic, GenerateRequest, GenerateResponse, GenerationSettings, Timings
from app.engine.pipeline import GenerationSpec
from app.lora.manager import LoraSpec
from app.service import InvalidRequest, draw_seed

router = APIRouter(tags=["generation"])


def lora_specs(body: GenerateRequest) -> list[LoraSpec]:
    """The request's LoRA set: `lora_configs`, plus the single `brand_id` when given."""
    specs = [LoraSpec(c.brand_id, c.weight, c.version, c.type) for c in body.lora_configs or []]
    if body.brand_id is not None:
        specs.append(LoraSpec(body.brand_id, body.lora_weights, body.version, None))
    seen: dict[tuple[str, str | None], int] = {}
    for i, spec in enumerate(specs):
        key = (spec.brand_id, spec.version)
        if key in seen:
            field = "brand_id" if body.brand_id is not None and i == len(specs) - 1 else "lora_configs"
            raise InvalidRequest(field, f"LoRA {spec.brand_id!r} is listed twice; give each LoRA once")
        seen[key] = i
    if body.version is not None and body.brand_id is None:
        raise InvalidRequest("version", "version needs brand_id")
    return specs


def generation_spec(body: GenerationSettings, seed: int) -> GenerationSpec:
    """The engine's view of the shared generation fields (used by /generate and /ab-test)."""
    return GenerationSpec(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=body.width,
        height=body.height,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        seed=seed,
    )


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, service: ServiceDep, request: Request) -> GenerateResponse:
    specs = lora_specs(body)
    service.check_limits(body.width, body.height, body.num_inference_steps, len(specs))
    spec = generation_spec(body, body.seed if body.seed is not None else draw_seed())
    outcome = await service.generate(spec, specs, strict=body.strict, disconnected=request.is_disconnected)
    return GenerateResponse(
        image=outcome.image_base64,
        seed=outcome.seed,
        width=outcome.width,
        height=outcome.height,
        loras=[AppliedLoraPublic(**vars(applied)) for applied in outcome.loras],
        warnings=outcome.warnings,
        timings=Timings(
            queue_ms=round(outcome.queue_ms, 2),
            lora_ms=round(outcome.lora_ms, 2),
            generation_ms=round(outcome.generation_ms, 2),
            total_ms=round(outcome.total_ms, 2),
        ),
    )
