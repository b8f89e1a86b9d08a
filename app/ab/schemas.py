"""Request and response models of the A/B test API (kept beside the feature; see the report on moving them)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from app.api.schemas import (
    MAX_SEED,
    AppliedLoraPublic,
    GenerationSettings,
    LoraConfig,
    LoraId,
    LoraWeight,
    StrictModel,
    Timings,
    VersionId,
)

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class GridAxisRequest(StrictModel):
    brand_id: LoraId
    weights: Annotated[list[LoraWeight], Field(min_length=1, max_length=64)] = Field(
        description="the weights this LoRA is tried at", examples=[[0.2, 0.8]]
    )
    version: VersionId | None = None
    type: Annotated[str, Field(max_length=64)] | None = None


class VariantRequest(StrictModel):
    lora_configs: Annotated[list[LoraConfig], Field(max_length=64)] = Field(
        default_factory=list, description="the LoRA set of this variant; empty = the base model"
    )


class AbTestRequest(GenerationSettings):
    seeds: Annotated[list[Seed], Field(min_length=1, max_length=16)] | None = Field(
        None, description="every variant is generated with each of these seeds (instead of `seed`)"
    )
    variants: Annotated[list[VariantRequest], Field(min_length=1, max_length=256)] | None = None
    grid: Annotated[list[GridAxisRequest], Field(min_length=1, max_length=8)] | None = Field(
        None, description="each LoRA with the weights to try; the variants are their cartesian product"
    )
    strict: bool = Field(False, description="fail with 422 instead of falling back when a LoRA cannot be applied")

    model_config = {
        "extra": "forbid",
        "strict": True,
        "json_schema_extra": {
            "examples": [
                {"prompt": "a red coffee cup on a table", "seed": 42, "width": 256, "height": 256,
                 "grid": [{"brand_id": "acme", "weights": [0.2, 0.8]},
                          {"brand_id": "globex", "weights": [0.0, 0.5]}]},
                {"prompt": "a phone on a desk", "seeds": [1, 2], "variants": [
                    {"lora_configs": []},
                    {"lora_configs": [{"brand_id": "acme", "weight": 0.5}]}]},
            ]
        },
    }

    @model_validator(mode="after")
    def _one_source_of_variants(self) -> AbTestRequest:
        if (self.variants is None) == (self.grid is None):
            raise ValueError("give exactly one of `variants` (explicit LoRA sets) or `grid` (weights per LoRA)")
        if self.seed is not None and self.seeds is not None:
            raise ValueError("give `seed` or `seeds`, not both")
        return self


class AbImagePublic(BaseModel):
    seed: int
    image: str = Field(description="base64-encoded PNG")
    timings: Timings


class AbVariantPublic(BaseModel):
    index: int
    label: str = Field(description="the variant's weights, e.g. 'acme 0.2, globex 0.5'")
    lora_configs: list[LoraConfig] = Field(description="the LoRA set as asked")
    loras: list[AppliedLoraPublic] = Field(description="the LoRAs applied, as /generate reports them")
    seed: int
    image: str = Field(description="base64-encoded PNG for `seed`")
    timings: Timings
    warnings: list[str]
    extra_images: list[AbImagePublic] = Field(
        default_factory=list, description="the images for the other `seeds`, in order"
    )


class AbTestTimings(BaseModel):
    lora_load_ms: float = Field(description="loading the test's LoRA files (once, for all variants)")
    total_ms: float


class AbTestResponse(BaseModel):
    test_id: str
    seeds: list[int]
    width: int
    height: int
    rows: int = Field(description="the contact sheet's rows (first LoRA's weights for a 2-D grid)")
    cols: int
    variants: list[AbVariantPublic]
    contact_sheet: str = Field(description="base64 PNG: every variant, labelled with its weights")
    warnings: list[str]
    timings: AbTestTimings


class AbChoiceRequest(StrictModel):
    variant: Annotated[int, Field(ge=0)]
    chosen_by: Annotated[str, Field(max_length=200)] | None = None
    reason: Annotated[str, Field(max_length=2000)] | None = None


class AbChoicePublic(BaseModel):
    test_id: str
    variant: int
    chosen_by: str | None
    reason: str | None
    created_at: str


class AbTestPublic(BaseModel):
    test_id: str
    created_at: str
    prompt: str
    settings: dict
    variants: list[dict]
    choices: list[AbChoicePublic]


class AbResultsPublic(BaseModel):
    brand_id: str
    recommended_weight: float | None = Field(
        description="the brand's weight in the most recently chosen variant; null when nothing was chosen"
    )
    data: list[AbTestPublic]
    count: int
