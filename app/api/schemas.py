"""Request and response models of the HTTP API (with examples for the OpenAPI page).

Requests turn into the request path's value types here (`to_spec`, `spec`), once for every route.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import FastAPI
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from app.api.prompt_loras import parse_prompt
from app.config import Settings
from app.editing import build_edit, decode_base64_image
from app.jobs import EditSpec, GenerationSpec, LoraSpec
from app.lora.registry import ID_PATTERN
from app.samplers import DEFAULT_SCHEDULER, SCHEDULER_NAMES


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

    def to_spec(self) -> LoraSpec:
        return LoraSpec(self.brand_id, self.weight, self.version, self.type)


class GenerationSettings(StrictModel):
    """The fields every generation shares (`/generate`, `/ab-test`)."""

    prompt: Annotated[str, Field(min_length=1, max_length=2000, pattern=r"\S")]
    negative_prompt: Annotated[str, Field(max_length=2000)] | None = None
    # The maxima are the settings' (MAX_WIDTH, MAX_HEIGHT, MAX_STEPS): checked by the service, shown in the
    # OpenAPI schema by `show_configured_maxima`.
    width: Annotated[int, Field(ge=64, multiple_of=8)] = 512
    height: Annotated[int, Field(ge=64, multiple_of=8)] = 512
    num_inference_steps: Annotated[int, Field(ge=1)] = 20
    guidance_scale: Annotated[float, Field(ge=0.0, le=30.0, allow_inf_nan=False)] = 7.5
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = Field(
        None, description="0..4294967295; drawn at random (and returned) when absent"
    )
    scheduler: Literal[SCHEDULER_NAMES] = Field(  # type: ignore[valid-type]
        DEFAULT_SCHEDULER, description="sampler: " + ", ".join(SCHEDULER_NAMES) + " (pndm = the model's own)"
    )

    def spec(self, seed: int) -> GenerationSpec:
        """The engine's settings for one image of this request, with `seed` (<lora:...> tags taken out)."""
        return GenerationSpec(
            edit=self.edit_spec(),
            prompt=parse_prompt(self.prompt)[0],
            prompt_as_sent=self.prompt,
            scheduler=self.scheduler,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=seed,
        )

    def edit_spec(self) -> EditSpec | None:
        """The image edit this request asks for; None for text to image."""
        return None


# A base64 image of MAX_DECODE_PIXELS (app/editing.py) fits; the body limit (MAX_IMAGE_BODY_BYTES) applies first.
Base64Image = Annotated[str, Field(min_length=1, max_length=64 * 1024 * 1024)]


class GenerateRequest(GenerationSettings):
    brand_id: LoraId | None = Field(None, description="apply this brand's LoRA (latest version unless `version`)")
    version: VersionId | None = None
    lora_weights: LoraWeight = Field(0.8, description="weight of `brand_id`'s LoRA, 0.0-1.0")
    lora_configs: Annotated[list[LoraConfig], Field(max_length=64)] | None = Field(
        None, description="several LoRAs composed, each with its own weight"
    )
    strict: bool = Field(False, description="fail with 422 instead of falling back when a LoRA cannot be applied")
    # Image editing (docs/editing.md): img2img with `init_image`, inpainting with `mask_image` too.
    init_image: Base64Image | None = Field(
        None,
        description="img2img: base64 PNG/JPEG/WebP (a data:image/...;base64, prefix is accepted), "
        "resized to width x height",
    )
    strength: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = Field(
        0.75, description="how much of init_image is repainted: 0 keeps it, 1 starts from noise"
    )
    mask_image: Base64Image | None = Field(
        None, description="inpainting: white = repaint, black = keep; the size of init_image"
    )
    mask_blur: Annotated[int, Field(ge=0, le=64)] = Field(4, description="blur radius of the mask, pixels")
    mask_invert: bool = Field(False, description="black = repaint instead")
    inpaint_only_masked: bool = Field(
        False, description="inpaint only the mask's box (plus inpaint_padding), at the full width x height"
    )
    inpaint_padding: Annotated[int, Field(ge=0, le=256)] = Field(
        32, description="pixels around the mask's box in inpaint_only_masked mode"
    )
    masked_content: Literal["original", "fill"] = Field(
        "original", description="inpainting starts from the image (original) or its surroundings' colours (fill)"
    )
    _edit: EditSpec | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _decode_images(self) -> GenerateRequest:
        """The images are decoded and checked here, once, for every route built on this request."""
        if self.init_image is None:
            if self.mask_image is not None:
                raise ValueError("mask_image needs init_image (the image to repaint)")
            return self
        image = decode_base64_image(self.init_image, "init_image")
        mask = decode_base64_image(self.mask_image, "mask_image") if self.mask_image is not None else None
        if int(self.num_inference_steps * self.strength) < 1:
            raise ValueError(
                f"strength {self.strength:g} x num_inference_steps {self.num_inference_steps} leaves no denoising "
                "step; raise strength or num_inference_steps"
            )
        self._edit = build_edit(
            init_image=image, mask_image=mask, width=self.width, height=self.height, strength=self.strength,
            mask_blur=self.mask_blur, mask_invert=self.mask_invert, inpaint_only_masked=self.inpaint_only_masked,
            inpaint_padding=self.inpaint_padding, masked_content=self.masked_content,
        )  # fmt: skip
        return self

    def edit_spec(self) -> EditSpec | None:
        return self._edit

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
    generation_ms: float = Field(description="the denoising loop; a batch's time split over its images")
    total_ms: float


class GenerateResponse(BaseModel):
    image: str = Field(description="base64-encoded PNG")
    seed: int
    width: int
    height: int
    loras: list[AppliedLoraPublic]
    warnings: list[str]
    timings: Timings
    batch_size: int = Field(1, description="images in the denoising loop this image ran in (BATCH_MAX_SIZE)")


class CacheStatsPublic(BaseModel):
    # Under Ray Serve (app/serve/) the numbers are totals over the replicas (max_size: their capacity
    # together) and an extra `replicas` object holds each replica's own stats, keyed by replica id.
    model_config = ConfigDict(extra="allow")

    enabled: bool
    max_size: int
    size: int
    cached: list[str] = Field(description="cached LoRAs as brand@version, least recently used first")
    pinned: list[str] = Field(
        description="preloaded LoRAs (LORA_PRELOAD_BRANDS): never evicted, not counted against max_size"
    )
    host: HostCacheStatsPublic | None = Field(
        None, description="the host-memory tier (LORA_HOST_CACHE_MB): adapters evicted from the device"
    )
    hits: int
    misses: int
    evictions: int
    hit_rate: float


class HostCacheStatsPublic(BaseModel):
    max_mb: float
    used_mb: float
    size: int
    cached: list[str] = Field(description="adapters kept converted in host memory, least recently used first")
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


# ---- A/B tests ---------------------------------------------------------------------------------------

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



class UiDefaults(BaseModel):
    """The A/B page's starting values (GET /ui/defaults)."""

    width: int
    height: int
    num_inference_steps: int
    maxima: dict[str, int] = Field(description="the configured maximum of each bounded field (MAX_WIDTH, ...)")


def show_configured_maxima(app: FastAPI, settings: Settings) -> None:
    """Give every request field bounded by a setting (`Settings.request_maxima`) that setting's value as its
    `maximum` in /openapi.json, wherever the field appears (/generate, /ab-test, /v1/images/generations)."""
    maxima = settings.request_maxima
    size_note = (
        f"width at most {settings.max_width} (MAX_WIDTH), height at most {settings.max_height} (MAX_HEIGHT), "
        f"width x height at most {settings.max_pixels} (MAX_PIXELS)"
    )
    default_openapi = app.openapi

    def mark(node) -> None:
        if isinstance(node, dict):
            properties = node.get("properties")
            if isinstance(properties, dict):
                for name, (setting, maximum) in maxima.items():
                    if isinstance(properties.get(name), dict) and properties[name].get("type") == "integer":
                        properties[name]["maximum"] = maximum
                        properties[name]["description"] = f"at most {maximum} ({setting})"
                if isinstance(properties.get("size"), dict) and properties["size"].get("type") == "string":
                    properties["size"]["description"] = f"'WxH', e.g. '512x512'; {size_note}"
            for value in node.values():
                mark(value)
        elif isinstance(node, list):
            for value in node:
                mark(value)

    def openapi() -> dict:
        first = app.openapi_schema is None
        schema = default_openapi()
        if first:
            mark(schema)
        return schema

    app.openapi = openapi


# ---- jobs ----------------------------------------------------------------------------------------------


class JobRequest(GenerateRequest):
    """POST /jobs: the /generate body, plus where to call back and whether to stream previews."""

    webhook_url: Annotated[str, Field(max_length=2000)] | None = Field(
        None, description="POSTed the job JSON when the job ends; its host must be in WEBHOOK_ALLOWED_HOSTS"
    )
    preview: bool = Field(
        False, description="progress events carry a preview (base64 PNG, <= 128 px) every PREVIEW_EVERY steps"
    )

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a red coffee cup on a table",
                    "brand_id": "acme",
                    "num_inference_steps": 20,
                    "preview": True,
                    "webhook_url": "https://hooks.example.com/images",
                },
            ]
        },
    )


class JobProgress(BaseModel):
    step: int = Field(description="denoising steps done, 1..steps")
    steps: int = Field(description="the steps the loop runs")


class JobError(BaseModel):
    status: int = Field(description="the HTTP status /generate would have answered")
    detail: str | list


class JobWebhook(BaseModel):
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int


class JobResultPublic(GenerateResponse):
    image: str | None = Field(None, description="base64-encoded PNG (left out of GET /jobs lists)")


class JobPublic(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    owner: str | None = Field(None, description="the API key's name that submitted it (null without keys)")
    progress: JobProgress
    created_at: str
    started_at: str | None
    finished_at: str | None
    result: JobResultPublic | None = Field(None, description="on success: the fields of /generate's reply")
    error: JobError | None = Field(None, description="on failure")
    webhook: JobWebhook | None = None


class JobCancelPublic(JobPublic):
    canceled: bool = Field(description="true when this call canceled the job; false when it had already ended")
    message: str


class JobListPublic(BaseModel):
    data: list[JobPublic]
    count: int
