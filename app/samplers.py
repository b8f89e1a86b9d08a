"""The sampler (scheduler) names a request may ask for, and their AUTOMATIC1111 display names.

Torch-free on purpose: the request schema, `GET /` and the PNG infotext use these names without
importing diffusers. The diffusers class behind each name is in `app/engine/schedulers.py`.
"""

from __future__ import annotations

DEFAULT_SCHEDULER = "pndm"

# name -> the display name AUTOMATIC1111 writes in its infotext ("Sampler: ...")
SAMPLER_DISPLAY_NAMES: dict[str, str] = {
    "pndm": "PNDM",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "lms": "LMS",
    "unipc": "UniPC",
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SAMPLER_DISPLAY_NAMES)


class UnknownScheduler(ValueError):
    def __init__(self, name: object):
        super().__init__(f"scheduler {name!r} is not known; allowed: {', '.join(SCHEDULER_NAMES)}")
        self.name = name


def check_scheduler(name: str) -> str:
    if name not in SAMPLER_DISPLAY_NAMES:
        raise UnknownScheduler(name)
    return name


def display_name(name: str) -> str:
    return SAMPLER_DISPLAY_NAMES[check_scheduler(name)]
