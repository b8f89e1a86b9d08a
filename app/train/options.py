"""The options of one training run: the CLI's flags and the HTTP endpoint's `config` JSON (torch-free)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.errors import InvalidRequest


class TrainOptions(BaseModel):
    """What one run trains; the names are the CLI flags (`--learning-rate`) and the JSON keys (`learning_rate`)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=1, le=100_000, description="optimizer steps")
    rank: int = Field(4, ge=1, le=128, description="LoRA rank (r)")
    alpha: float | None = Field(None, gt=0, le=1024, description="LoRA alpha; default: the rank (scale 1)")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate (constant)")
    resolution: int = Field(512, ge=64, le=1024, description="square training size, a multiple of 8")
    batch_size: int = Field(1, ge=1, le=64, description="images per step")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="LoRA init, batches, noise and timesteps")
    text_encoder: bool = Field(False, description="also train LoRA layers on the CLIP text encoder")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE's latent factor), e.g. {value - value % 8 or 64}")
        return value

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


def describe_errors(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """(field, message) for each problem, naming what is allowed."""
    problems = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "config"
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(TrainOptions.model_fields)
            message = f"unknown option {name!r}; allowed: {allowed}"
        else:
            message = f"{name}={error.get('input')!r}: {error['msg']}"
        problems.append((prefix + name, message))
    return problems


def parse_config_json(text: str) -> TrainOptions:
    """The endpoint's `config` field; InvalidRequest (422) naming the option that is wrong."""
    import json

    if not text.strip():
        return TrainOptions()
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest("config", f"config is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidRequest("config", f"config must be a JSON object of options, found {type(value).__name__}")
    try:
        return TrainOptions(**value)
    except ValidationError as exc:
        problems = describe_errors(exc, "config.")
        raise InvalidRequest(problems[0][0], "; ".join(message for _, message in problems)) from None
