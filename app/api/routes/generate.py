"""POST /generate."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.deps import ServiceDep
from app.api.prompt_loras import check_tag_duplicates
from app.api.schemas import AppliedLoraPublic, GenerateRequest, GenerateResponse, Timings
from app.errors import InvalidRequest, check_unique
from app.jobs import LoraSpec
from app.service import GenerationOutcome, draw_seed

router = APIRouter(tags=["generation"])


def lora_specs(body: GenerateRequest) -> list[LoraSpec]:
    """The request's LoRA set: `lora_configs`, plus the single `brand_id` when given."""
    specs = [config.to_spec() for config in body.lora_configs or []]
    fields = ["lora_configs"] * len(specs)
    if body.brand_id is not None:
        specs.append(LoraSpec(body.brand_id, body.lora_weights, body.version, None))
        fields.append("brand_id")
    elif body.version is not None:
        raise InvalidRequest("version", "version needs brand_id")
    check_unique(specs, fields=fields)
    return specs + check_tag_duplicates(body.prompt, specs)  # <lora:NAME:WEIGHT> tags in the prompt


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, service: ServiceDep, request: Request) -> GenerateResponse:
    specs = lora_specs(body)
    service.check_limits(body.width, body.height, body.num_inference_steps, len(specs))
    spec = body.spec(body.seed if body.seed is not None else draw_seed())
    outcome = await service.generate(spec, specs, strict=body.strict, disconnected=request.is_disconnected)
    return generate_response(outcome)


def generate_response(outcome: GenerationOutcome) -> GenerateResponse:
    """/generate's reply for an outcome; a job's `result` is this too (stored without `image`)."""
    return GenerateResponse(
        image=outcome.image_base64,
        seed=outcome.seed,
        width=outcome.width,
        height=outcome.height,
        loras=[AppliedLoraPublic(**vars(applied)) for applied in outcome.loras],
        warnings=outcome.warnings,
        timings=Timings(**outcome.timings()),
        batch_size=outcome.batch_size,
    )
