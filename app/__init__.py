"""Brand-image generation service: Stable Diffusion 1.5 with per-brand LoRA adapters."""

__version__ = "0.1.0"
SERVICE_NAME = "brand-image-service"
