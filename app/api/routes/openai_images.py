"""OpenAI-compatible `POST /v1/images/generations`, one more way into `/generate`'s path.

OpenAI clients send the service's own fields at the top level (`extra_body`): seed, negative_prompt,
num_inference_steps, guidance_scale, scheduler, brand_id, version, lora_weights, lora_configs, strict.
Each of the `n` images is one `GenerationService.generate` call with seed + i, so image i is
byte-identical to `/generate` with that seed. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`: a bad value is a 400 `invalid_request_error`
naming the parameter, a full queue a 429.

The body is parsed here (not by FastAPI) so that its errors get OpenAI's shape without touching the
app-wide error handlers; the OpenAPI page still documents the schema (`openapi_extra`).
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api.deps import get_service
from app.api.errors import answer_for
from app.api.routes.generate import lora_specs
from app.api.schemas import MAX_SEED, GenerateRequest, LoraConfig, LoraId, LoraWeight, VersionId
from app.errors import InvalidRequest
from app.samplers import DEFAULT_SCHEDULER, SCHEDULER_NAMES
from app.service import draw_seed

router = APIRouter(tags=["openai"])

MAX_IMAGES = 8
SIZE_PATTERN = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# The service's own fields, passed to /generate's request model as they are.
PASSED_THROUGH = (
    "negative_prompt", "num_inference_steps", "guidance_scale", "scheduler", "brand_id", "version",
    "lora_weights", "lora_configs", "strict",
)  # fmt: skip


class OpenAIImagesRequest(BaseModel):
    """OpenAI's image-generation body, plus this service's fields at the top level."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"prompt": "a red coffee cup <lora:acme:0.8>", "n": 2, "size": "512x512", "seed": 42,
                 "num_inference_steps": 20, "scheduler": "euler_a"},
            ]
        },
    )

    prompt: Annotated[str, Field(min_length=1, max_length=2000, pattern=r"\S")]
    n: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    size: Annotated[str, Field(pattern=SIZE_PATTERN.pattern, description="'WxH', e.g. '512x512'")] = "512x512"
    response_format: Literal["b64_json", "url"] = Field("b64_json", description="only b64_json is served")
    output_format: Literal["png"] = "png"
    model: str | None = Field(None, description="accepted and ignored: the service serves its one model")
    user: str | None = Field(None, description="accepted and ignored")
    quality: str | None = Field(None, description="accepted and ignored")
    style: str | None = Field(None, description="accepted and ignored")
    # The service's own fields (OpenAI clients: extra_body).
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = Field(None, description="image i uses seed + i")
    negative_prompt: Annotated[str, Field(max_length=2000)] | None = None
    num_inference_steps: Annotated[int, Field(ge=1, le=1000)] = 20
    guidance_scale: Annotated[float, Field(ge=0.0, le=30.0, allow_inf_nan=False)] = 7.5
    scheduler: Literal[SCHEDULER_NAMES] = DEFAULT_SCHEDULER  # type: ignore[valid-type]
    brand_id: LoraId | None = None
    version: VersionId | None = None
    lora_weights: LoraWeight = 0.8
    lora_configs: Annotated[list[LoraConfig], Field(max_length=64)] | None = None
    strict: bool = False


def _request_schema() -> dict:
    schema = OpenAIImagesRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # LoraConfig is already a component (GenerateRequest uses it)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def openai_error(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)


class _OpenAIError(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


@router.post(
    "/v1/images/generations",
    openapi_extra=_request_schema(),
    responses={400: {"description": "invalid request (OpenAI error shape)"}, 429: {"description": "queue full"}},
)
async def create_images(request: Request):
    try:
        return await _create_images(request)
    except _OpenAIError as exc:
        return exc.response
    except Exception as exc:
        answer = answer_for(exc)  # the service's error table, rendered in OpenAI's shape
        if answer is None:
            raise
        return openai_error(
            400 if answer.status == 422 else answer.status,
            answer.message,
            param="size" if answer.field in ("width", "height") else answer.field,
            code=OPENAI_CODES.get(answer.kind, "invalid_value"),
            kind=OPENAI_TYPES.get(answer.status, "invalid_request_error"),
            headers=answer.headers,
        )


# The error table's kinds and statuses in OpenAI's terms.
OPENAI_CODES = {"rate_limit": "rate_limit_exceeded", "lora_unavailable": "lora_unavailable"}
OPENAI_TYPES = {429: "rate_limit_error", 503: "server_error", 499: "server_error"}


async def _create_images(request: Request) -> dict:
    service = get_service(request.app.state.service_state)  # 503 while loading or draining
    body = _parse(await request.body())
    if body.response_format == "url":
        raise _OpenAIError(openai_error(
            400, "response_format 'url' is not supported: this service only serves 'b64_json' (base64 PNG)",
            param="response_format", code="invalid_value",
        ))  # fmt: skip
    generate = _generate_request(body)
    specs = lora_specs(generate)
    service.check_limits(generate.width, generate.height, generate.num_inference_steps, len(specs))
    if body.seed is None:
        first_seed = draw_seed() % (MAX_SEED + 2 - body.n)
    elif body.seed + body.n - 1 > MAX_SEED:
        raise InvalidRequest("seed", f"seed + n - 1 = {body.seed + body.n - 1} is above the maximum of {MAX_SEED}")
    else:
        first_seed = body.seed
    data = []
    for i in range(body.n):
        spec = generate.spec(first_seed + i)
        outcome = await service.generate(spec, specs, strict=generate.strict, disconnected=request.is_disconnected)
        data.append({"b64_json": base64.b64encode(outcome.png).decode("ascii")})
    return {"created": int(time.time()), "data": data}


def _parse(raw: bytes) -> OpenAIImagesRequest:
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _OpenAIError(openai_error(400, "the request body is not valid JSON", code="invalid_json")) from None
    if not isinstance(payload, dict):
        raise _OpenAIError(openai_error(400, "the request body must be a JSON object", code="invalid_json"))
    try:
        return OpenAIImagesRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise _OpenAIError(_validation_error(exc)) from None


def _validation_error(exc: ValidationError, param_of=None) -> JSONResponse:
    error = exc.errors()[0]
    loc = [str(part) for part in error.get("loc", ())]
    param = (param_of or (lambda name: name))(loc[0]) if loc else None
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return openai_error(400, f"Unrecognized request argument supplied: {param}", param=param,
                            code="unknown_parameter")  # fmt: skip
    if kind == "missing":
        return openai_error(400, f"Missing required parameter: '{param}'.", param=param,
                            code="missing_required_parameter")  # fmt: skip
    where = ".".join(loc)
    message = f"Invalid value for '{where}': {error.get('msg', '')}"
    if param == "size" and loc and loc[0] != "size":
        message = f"Invalid size: {loc[0]} {error.get('msg', '')} (size is 'WxH')"
    return openai_error(400, message, param=param, code="invalid_value")


def _generate_request(body: OpenAIImagesRequest) -> GenerateRequest:
    """The same request as /generate would get, validated by /generate's model (size -> width, height)."""
    width, height = (int(x) for x in SIZE_PATTERN.fullmatch(body.size).groups())
    fields = {"prompt": body.prompt, "width": width, "height": height}
    for name in PASSED_THROUGH:
        value = getattr(body, name)
        if value is not None:
            fields[name] = value.model_dump() if isinstance(value, BaseModel) else value
    if body.lora_configs is not None:
        fields["lora_configs"] = [c.model_dump() for c in body.lora_configs]
    try:
        return GenerateRequest.model_validate_json(json.dumps(fields))
    except ValidationError as exc:
        size_param = lambda name: "size" if name in ("width", "height") else name  # noqa: E731
        raise _OpenAIError(_validation_error(exc, size_param)) from None
