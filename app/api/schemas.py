"""Request and response models of the HTTP API (with examples for the OpenAPI page)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.lora.registry import ID_PATTERN


def _no_dot_dot(value: str) -> str:
    if ".." in value:
        raise ValueError("must not contain '..'")
    return value


LoraId = Annotated[
    str,
    Field(pattern=ID_PATTERN.pattern, examples=["acme"]),
    AfterValidator(_no_dot_dot),
]
VersionId = Annotated[
    str,
    Field(pattern=ID_PATTERN.pattern, description="a version folder such as 'v2'; default: the latest"),
    AfterValidator(_no_dot_dot),
]
LoraWeight = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
MAX_SEED = 2**32 - 1


class StrictModel(BaseModel):
    # Unknown fields are an error (a typo must not be silently ignored); "512" is not a number.
    model_config = ConfigDict(extra="forbid", strict=True)


class LoraConfig(StrictModel):
    brand_id: LoraId
    weight: LoraWeight = 0.8
    version: VersionId | None = None
    type: Annotated[str, Field(max_length=64)] | None = Field(
        None, description="free label echoed back, e.g. style / product / photography"
    )


class GenerationSettings(StrictModel):
    """The fields every generation shares (`/generate`, `/ab-test`)."""

    prompt: Annotated[str, Field(min_length=1, max_length=2000, pattern=r"\S")]
    negative_prompt: Annotated[str, Field(max_length=2000)] | None = None
    width: Annotated[int, Field(ge=64, le=4096, multiple_of=8)] = 512
    height: Annotated[int, Field(ge=64, le=4096, multiple_of=8)] = 512
    num_inference_steps: Annotated[int, Field(ge=1, le=1000)] = 20
    guidance_scale: Annotated[float, Field(ge=0.0, le=30.0, allow_inf_nan=False)] = 7.5
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = Field(
        None, description="0..4294967295; drawn at random (and returned) when absent"
    )


class GenerateRequest(GenerationSettings):
    brand_id: LoraId | None = Field(None, description="apply this brand's LoRA (latest version unless `version`)")
    version: VersionId | None = None
    lora_weights: LoraWeight = Field(0.8, description="weight of `brand_id`'s LoRA, 0.0-1.0")
    lora_configs: Annotated[list[LoraConfig], Field(max_length=64)] | None = Field(
        None, description="several LoRAs composed, each with its own weight"
    )
    strict: bool = Field(False, description="fail with 422 instead of falling back when a LoRA cannot be applied")

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"prompt": "a red coffee cup on a table", "width": 256, "height": 256, "num_inference_steps": 20,
                 "seed": 42},
                {"prompt": "a red coffee cup on a table", "brand_id": "acme", "lora_weights": 0.8, "seed": 42},
                {"prompt": "a phone on a desk", "seed": 7, "lora_configs": [
                    {"brand_id": "acme", "weight": 0.7, "type": "style"},
                    {"brand_id": "studio-light", "weight": 0.4, "type": "photography"}]},
            ]
        },
    )


class AppliedLoraPublic(BaseModel):
    brand_id: str
    version: str
    weight: float
    type: str | None = None
    file: str
    sha256: str


class Timings(BaseModel):
    queue_ms: float = Field(description="waiting for the generation worker")
    lora_ms: float = Field(description="loading LoRA files (cache misses) and switching adapters")
    generation_ms: float
    total_ms: float


class GenerateResponse(BaseModel):
    image: str = Field(description="base64-encoded PNG")
    seed: int
    width: int
    height: int
    loras: list[AppliedLoraPublic]
    warnings: list[str]
    timings: Timings


class CacheStatsPublic(BaseModel):
    enabled: bool
    max_size: int
    size: int
    cached: list[str] = Field(description="cached LoRAs as brand@version, least recently used first")
    hits: int
    misses: int
    evictions: int
    hit_rate: float


class CacheClearPublic(BaseModel):
    cleared: int


class LoraSummaryPublic(BaseModel):
    brand_id: str
    versions: list[str]
    latest: str | None
    file: str | None
    size_bytes: int | None = None
    sha256: str | None = None
    format: str | None = None
    cached: bool = False
    valid: bool
    invalid_reason: str | None = None
    type: str | None = None
    metadata_summary: dict | None = None
    unsupported_files: list[str] = Field(default_factory=list, description="pickle files that are never loaded")


class LoraListPublic(BaseModel):
    data: list[LoraSummaryPublic]
    count: int = Field(description="total number of brands (all pages)")
    offset: int
    limit: int


class LoraFilePublic(BaseModel):
    path: str
    size_bytes: int
    sha256: str
    format: str | None = Field(description="kohya, peft or diffusers (from the key names)")
    rank: int | None
    alpha: float | None
    target_modules: int | None
    has_text_encoder: bool | None
    dtype: str | None
    valid: bool
    invalid_reason: str | None
    cached: bool


class LoraMetadataPublic(BaseModel):
    brand_id: str
    version: str
    versions: list[str]
    latest: str
    metadata: dict | None = Field(description="metadata.json beside the file, fields kept as they are")
    metadata_error: str | None = None
    file: LoraFilePublic
    recommended_weight: float | None = Field(
        None, description="this brand's weight in the most recently chosen A/B variant (POST /ab-test/{id}/choice)"
    )
