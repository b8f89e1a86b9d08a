"""Every setting of the service, read once from the environment and `.env`, validated at start-up.

Nothing else in the app reads `os.environ`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The reserved MODEL_ID that selects the tiny embedded SD-1.5-architecture model (random weights).
EMBEDDED_MODEL_ID = "tiny"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Model
    model_id: str = Field(
        EMBEDDED_MODEL_ID,
        description="Hub id or local diffusers folder of an SD 1.5 model; 'tiny' = the embedded test model",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    model_cache_dir: Path = Field(PROJECT_ROOT / ".cache" / "models", description="where the embedded model is saved")
    compile_unet: bool = Field(False, description="torch.compile the UNet (pays on a GPU; compiled code is cached)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode; reduce-overhead captures CUDA graphs"
    )
    compile_warmup_size: int = Field(512, ge=64, le=4096, description="the size compiled at start-up (width = height)")
    torch_threads: int = Field(0, ge=0, le=256, description="CPU threads for torch; 0 = torch's default")

    # LoRA files and the resident adapter cache
    lora_base_dir: Path = PROJECT_ROOT / "loras"
    lora_cache_enabled: bool = True
    lora_cache_max_size: int = Field(5, ge=1, le=1000, description="adapters resident on the device (LRU)")
    lora_host_cache_mb: int = Field(
        2048, ge=0, description="host memory for adapters evicted from the device, kept converted; 0 = off"
    )
    lora_preload_brands: str = Field("", description="comma-separated brand ids loaded at start-up")
    lora_hash_on_start: bool = Field(
        True, description="hash each brand's latest LoRA file in the background at start-up, off the request path"
    )
    lora_max_per_request: int = Field(8, ge=1, le=64)
    lora_max_file_mb: int = Field(1024, ge=1)

    # Request bounds
    max_width: int = Field(1024, ge=64)
    max_height: int = Field(1024, ge=64)
    max_pixels: int = Field(1024 * 1024, ge=64 * 64)
    max_steps: int = Field(100, ge=1)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    max_image_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="the body limit of requests that may carry images (editing)"
    )

    # A/B tests
    ab_max_variants: int = Field(16, ge=1, le=256)
    data_dir: Path = Field(PROJECT_ROOT / "data", description="where the A/B test store (SQLite) lives")

    # Jobs (POST /jobs): records in DATA_DIR/jobs.sqlite3, images in DATA_DIR/jobs/
    job_ttl_s: float = Field(86400.0, gt=0, description="finished jobs (records and images) are purged after this")
    jobs_max_pending: int = Field(1000, ge=1, description="jobs queued or running; beyond, POST /jobs answers 429")
    preview_every: int = Field(5, ge=1, le=1000, description="a job's preview (when asked) every this many steps")
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key of X-Webhook-Signature; webhooks are refused while it is unset"
    )
    webhook_allowed_hosts: str = Field(
        "", description="comma-separated hosts a webhook_url may name (host or host:port); empty = no webhooks"
    )
    webhook_retry_backoff_s: float = Field(
        1.0, ge=0, le=600, description="wait before the first webhook retry; doubled before each of the next two"
    )

    # Training jobs (POST /lora/{brand_id}/train)
    train_max_dataset_mb: int = Field(
        512, ge=1, description="largest dataset zip, and the most its files may add up to once extracted"
    )
    train_max_images: int = Field(1000, ge=1, description="most images in one training dataset")

    # Serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_queue_size: int = Field(16, ge=0)
    request_timeout_s: float = Field(300.0, gt=0)
    batch_max_size: int = Field(4, ge=1, le=64, description="images per denoising loop; 1 turns batching off")
    batch_wait_ms: float = Field(
        10.0,
        ge=0,
        le=10_000,
        description="how long the worker may wait to fill a batch when the queue is short and others are on their way",
    )
    batch_mixed: bool = Field(True, description="batch images of different LoRA sets (per-image low-rank deltas)")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, how long accepted requests may finish")
    watchdog_s: float = Field(
        300.0, ge=0, description="/ready is 503 when the worker makes no progress this long while work waits; 0 = off"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json = one JSON object per log line")

    # Ray Serve (`brand-image-serve`, app/serve/): replicas that each own an engine, its LoRA cache
    # (LORA_CACHE_MAX_SIZE adapters per replica) and its queue, behind one ingress. Unused by uvicorn.
    ray_replicas: int = Field(2, ge=1, le=1024, description="generation replicas (each loads the model once)")
    ray_replica_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica")
    ray_replica_gpus: float = Field(
        0.0, ge=0, description="GPUs Ray reserves per replica (1 per replica on a GPU host; fractions share one)"
    )
    ray_max_ongoing: int = Field(
        4, ge=1, le=1024, description="requests one replica takes at once; beyond, a set spills to another replica"
    )
    ray_routing: Literal["affinity", "random"] = Field(
        "affinity", description="affinity = a LoRA set goes to the replica that holds it; random = Ray's default"
    )
    ray_hot_margin: float = Field(
        0.25,
        ge=0,
        le=10,
        description="a LoRA set gets copies on more replicas when its share of recent requests is above "
        "(1 + this) / RAY_REPLICAS, more than one replica can carry (and until it falls to 1 / RAY_REPLICAS)",
    )
    ray_hot_window: int = Field(200, ge=10, le=100_000, description="recent requests the hot-set share is taken over")
    ray_retries: int = Field(1, ge=0, le=5, description="retries on another replica when a replica dies mid-request")
    ray_address: str = Field("", description="Ray cluster address for brand-image-serve; empty = start a local one")
    ray_bind_host: str = Field(
        "127.0.0.1",
        description="where the local Ray instance that brand-image-serve starts listens (GCS, raylet, workers, "
        "agents); 127.0.0.1 = this machine only. Another address: this machine's IP that other Ray nodes reach "
        "(Ray 2.60 then listens on all interfaces: fence it). Unused with RAY_ADDRESS",
    )

    # Auth: with no keys set everything is open (start-up logs a warning). See docs/tenants.md.
    api_keys_file: Path | None = Field(
        None,
        description="TOML file of brand-scoped keys (sha256, brands, roles, requests_per_minute); re-read when it "
        "changes and on SIGHUP",
    )
    api_key: SecretStr | None = Field(
        None, description="a Bearer key with brands ['*'] and the generate role (name API_KEY in logs)"
    )
    admin_api_key: SecretStr | None = Field(
        None, description="a Bearer key with brands ['*'] and the admin role (name ADMIN_API_KEY in logs)"
    )

    @field_validator("model_id")
    @classmethod
    def _model_id_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("MODEL_ID must not be empty (use 'tiny' for the embedded model)")
        return value.strip()

    @field_validator("api_key", "admin_api_key", "webhook_secret", mode="before")
    @classmethod
    def _blank_key_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _blank_path_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file_parses(cls, value: Path | None) -> Path | None:
        if value is not None:
            from app.access import KeysFileError, keys_file_label, parse_keys_file  # the parser of every reload

            try:
                parse_keys_file(value)
            except KeysFileError as exc:  # the message names the line
                reason = str(exc).removeprefix(keys_file_label(value) + ": ")
                raise PydanticCustomError("api_keys_file", "{reason}", {"reason": reason}) from None
        return value

    @model_validator(mode="after")
    def _device_dtype_fit(self) -> Settings:
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError("DTYPE=float16 is not supported with DEVICE=cpu; use float32")
        return self

    @property
    def preload_brands(self) -> list[str]:
        return [b.strip() for b in self.lora_preload_brands.split(",") if b.strip()]

    @property
    def webhook_hosts(self) -> list[str]:
        return [h.strip().lower() for h in self.webhook_allowed_hosts.split(",") if h.strip()]

    @property
    def uses_embedded_model(self) -> bool:
        return self.model_id == EMBEDDED_MODEL_ID

    @property
    def request_maxima(self) -> dict[str, tuple[str, int]]:
        """Each bounded request field -> (the setting that bounds it, its value): the one bound of that field,
        checked by the service and shown as `maximum` in the OpenAPI schema."""
        return {
            "width": ("MAX_WIDTH", self.max_width),
            "height": ("MAX_HEIGHT", self.max_height),
            "num_inference_steps": ("MAX_STEPS", self.max_steps),
        }


# Settings that were replaced: one still set would otherwise be ignored without a word.
REPLACED_SETTINGS = {
    "RAY_HOT_SHARE": "RAY_HOT_MARGIN (a LoRA set gets copies on more replicas only above a share of "
    "(1 + RAY_HOT_MARGIN) / RAY_REPLICAS; docs/scale-out.md)",
}


def replaced_settings_in_use(env_file: str | Path = ".env") -> list[str]:
    """The replaced settings still set in the environment or the `.env` file."""
    from dotenv import dotenv_values

    given = set(os.environ) | set(dotenv_values(env_file) if Path(env_file).is_file() else {})
    return [name for name in REPLACED_SETTINGS if name in given]


def load_settings() -> Settings:
    """Read the settings, or stop with a message that names each bad variable (every entry point uses this)."""
    replaced = replaced_settings_in_use()
    if replaced:
        raise SystemExit("Invalid configuration: " + "; ".join(
            f"{name} was replaced by {REPLACED_SETTINGS[name]}: remove it" for name in replaced
        ))  # fmt: skip
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            variable = "_".join(str(part) for part in error["loc"]).upper() or "settings"
            lines.append(f"  {variable}={error.get('input')!r}: {error['msg']}")
        if len(lines) == 1:
            raise SystemExit("Invalid configuration: " + lines[0].strip()) from None
        raise SystemExit("Invalid configuration:\n" + "\n".join(lines)) from None
