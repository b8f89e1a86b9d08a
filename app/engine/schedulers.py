"""One fresh diffusers scheduler per generation, built from the model's own scheduler config.

Schedulers hold per-run state (timesteps, the multistep solvers' history), so a scheduler is never
shared between generations: the engine builds one for each call, under its generation lock, and hands
it to the pipeline for that call. Building one is a config copy (well under a millisecond).
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from app.samplers import DEFAULT_SCHEDULER, SCHEDULER_NAMES, check_scheduler

# name -> (class, extra from_config arguments). "pndm" is the model's own scheduler (PNDM for SD 1.5).
SCHEDULER_CLASSES: dict[str, tuple[type | None, dict]] = {
    DEFAULT_SCHEDULER: (None, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
assert tuple(SCHEDULER_CLASSES) == SCHEDULER_NAMES


def make_scheduler(name: str, model_scheduler_class: type, model_scheduler_config):
    """A new scheduler `name` for one generation; `pndm` is a new instance of the model's own class."""
    cls, extra = SCHEDULER_CLASSES[check_scheduler(name)]
    return (cls or model_scheduler_class).from_config(model_scheduler_config, **extra)
