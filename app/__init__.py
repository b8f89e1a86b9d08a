"""Brand-image generation service: Stable Diffusion 1.5 with per-brand LoRA adapters."""

import logging

__version__ = "0.1.0"
SERVICE_NAME = "brand-image-service"


class _DropMessage(logging.Filter):
    """Drops a third-party logger's records that contain `fragment`; every other record passes."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


# transformers says, once per class, that CLIP's and SigLIP's image processors fall back to PIL because
# torchvision is not installed. The pipeline uses no image processor (no safety checker), so on every start
# (server, replica, training) the lines mean nothing to a user. Set here, on the emitting logger, because
# the package is imported before diffusers is, in every process.
TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"
logging.getLogger("transformers.utils.import_utils").addFilter(_DropMessage(TORCHVISION_FALLBACK))
