"""LoRA training for a brand: `python -m app.train` and `train_lora` (the library function).

Torch-free at import: the HTTP layer imports the options, the dataset checks and the job manager
from here without loading torch; `train_lora` imports the trainer (torch, diffusers, peft) on use.
"""

from __future__ import annotations


def train_lora(*args, **kwargs):
    """See app.train.trainer.train_lora."""
    from app.train.trainer import train_lora as run

    return run(*args, **kwargs)
