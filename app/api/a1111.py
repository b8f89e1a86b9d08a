"""AUTOMATIC1111's `/sdapi/v1` in our terms: its request becomes /generate's request (`GenerateRequest`, so
the same spec, LoRA set, prompt tags and image checks), our outcome becomes its reply. Nothing else.

A field we cannot honour at a non-default value is an `InvalidRequest` naming it (422): we never give an
image other than the one asked for. The fields and defaults are those the `webuiapi` client (0.9.17)
sends.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from app import infotext
from app.api.schemas import MAX_SEED, GenerateRequest
from app.editing import png
from app.errors import InvalidRequest
from app.infotext import model_name
from app.jobs import StepControl

# A1111's sampler names -> ours (app/samplers.py).
SAMPLERS: dict[str, str] = {
    "Euler a": "euler_a",
    "Euler": "euler",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "DDIM": "ddim",
    "PLMS": "pndm",
    "LMS": "lms",
    "UniPC": "unipc",
}
SAMPLER_ALIASES: dict[str, list[str]] = {
    "Euler a": ["k_euler_a", "k_euler_ancestral"],
    "Euler": ["k_euler"],
    "DPM++ 2M": ["k_dpmpp_2m"],
    "DPM++ 2M Karras": ["k_dpmpp_2m_ka"],
    "DDIM": [],
    "PLMS": [],
    "LMS": ["k_lms"],
    "UniPC": [],
}
SCHEDULERS = {"automatic": "Automatic", "karras": "Karras"}
# A1111's names of our fields, for error messages.
FIELD_NAMES = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "scheduler": "sampler_name",
    "init_image": "init_images",
    "mask_image": "mask",
    "strength": "denoising_strength",
    "mask_invert": "inpainting_mask_invert",
    "inpaint_only_masked": "inpaint_full_res",
    "inpaint_padding": "inpaint_full_res_padding",
    "masked_content": "inpainting_fill",
}
MAX_IMAGES = 16  # batch_size x n_iter


class Txt2ImgRequest(BaseModel):
    """`/sdapi/v1/txt2img`: every field `webuiapi` sends, with its defaults. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # deprecated in A1111: the sampler when sampler_name is absent
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_churn: float = 0.0
    s_tmax: float | None = None
    s_tmin: float = 0.0
    s_noise: float = 1.0
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] | None = None
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] | None = None
    denoising_strength: float | None = None
    # hires fix: refused when enabled; its settings are ignored otherwise (as A1111 does)
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(Txt2ImgRequest):
    """`/sdapi/v1/img2img`: txt2img's fields plus the image, the mask and how they are used."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None  # instruct-pix2pix models only: no effect on SD 1.5 (nor in A1111)
    mask: str | None = None
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False
    denoising_strength: float | None = 0.75


def parse(model: type[BaseModel], payload: bytes) -> Txt2ImgRequest:
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error.get("loc", ())) or "body"
        if error.get("type") == "extra_forbidden":
            message = f"{field} is not a field of AUTOMATIC1111's API that this service knows"
            raise InvalidRequest(field, message) from None
        raise InvalidRequest(field, f"{field}: {error.get('msg', '')}") from None


def sampler(body: Txt2ImgRequest) -> str:
    name = body.sampler_name or body.sampler_index or "Euler a"
    if name not in SAMPLERS:
        field = "sampler_name" if body.sampler_name else "sampler_index"
        raise InvalidRequest(field, f"sampler {name!r} is not known; known samplers: {', '.join(SAMPLERS)}")
    scheduler = (body.scheduler or "automatic").lower()
    if scheduler not in SCHEDULERS:
        known = ", ".join(SCHEDULERS.values())
        raise InvalidRequest("scheduler", f"scheduler {body.scheduler!r} is not known; known schedulers: {known}")
    if scheduler == "karras":
        if name not in ("DPM++ 2M", "DPM++ 2M Karras"):
            raise InvalidRequest("scheduler", f"scheduler Karras is served with DPM++ 2M only, not with {name!r}")
        return "dpmpp_2m_karras"
    return SAMPLERS[name]


def refuse_unhonoured(body: Txt2ImgRequest, model_id: str) -> None:
    """422 for each field at a value we cannot honour (the first one found)."""

    def refuse(field: str, why: str) -> None:
        raise InvalidRequest(field, f"{field} {why}; this service cannot honour it")

    if body.enable_hr:
        refuse("enable_hr", "(hires fix) is not supported")
    if body.restore_faces:
        refuse("restore_faces", "is not supported")
    if body.tiling:
        refuse("tiling", "is not supported")
    if body.subseed_strength > 0:
        refuse("subseed_strength", "> 0 (variation seeds) is not supported")
    if body.seed_resize_from_h > 0 or body.seed_resize_from_w > 0:
        refuse("seed_resize_from_w" if body.seed_resize_from_w > 0 else "seed_resize_from_h", "is not supported")
    if body.script_name:
        refuse("script_name", f"{body.script_name!r}: scripts are not supported")
    if body.styles:
        refuse("styles", "(saved prompt styles) are not supported")
    for name, script in (body.alwayson_scripts or {}).items():
        args = script.get("args", []) if isinstance(script, dict) else script
        if args not in ([], [False], None):
            refuse("alwayson_scripts", f"{name!r} has arguments: extensions are not supported")
    if body.eta is not None and body.eta != 1.0:
        refuse("eta", f"{body.eta:g} is not supported (ancestral samplers run with eta 1, DDIM with 0)")
    for field, default in (("s_churn", 0.0), ("s_tmin", 0.0), ("s_noise", 1.0)):
        if getattr(body, field) != default:
            refuse(field, f"{getattr(body, field):g} is not supported (only {default:g})")
    if body.s_tmax not in (None, 0.0) and body.s_tmax != float("inf"):
        refuse("s_tmax", "is not supported")
    for key, value in (body.override_settings or {}).items():
        if key == "sd_model_checkpoint" and value == model_name(model_id):
            continue
        if key == "CLIP_stop_at_last_layers" and value == 1:
            continue
        if key == "sd_model_checkpoint":
            refuse("override_settings", f"asks for the model {value!r}; this service serves {model_name(model_id)!r}")
        refuse("override_settings", f"sets {key!r}, a setting this service does not have")
    if isinstance(body, Img2ImgRequest):
        if body.resize_mode != 0:
            refuse("resize_mode", f"{body.resize_mode} is not supported (only 0, just resize)")
        if body.initial_noise_multiplier not in (None, 1.0):
            refuse("initial_noise_multiplier", "other than 1 is not supported")
        if body.inpainting_fill not in (0, 1):
            refuse("inpainting_fill", f"{body.inpainting_fill} (latent noise or nothing; 0 fill and 1 original are)")
        if body.mask_blur is None and body.mask_blur_x != body.mask_blur_y:
            refuse("mask_blur_x", "differing from mask_blur_y is not supported")


def seeds(body: Txt2ImgRequest, draw_seed) -> list[int]:
    count = body.batch_size * body.n_iter
    if body.batch_size < 1 or body.n_iter < 1 or count > MAX_IMAGES:
        raise InvalidRequest("batch_size", f"batch_size x n_iter must be 1 to {MAX_IMAGES}, not {count}")
    if body.seed == -1:
        first = draw_seed() % (MAX_SEED + 2 - count)
    elif not 0 <= body.seed <= MAX_SEED - count + 1:
        raise InvalidRequest("seed", f"seed must be -1 (random) or 0 to {MAX_SEED - count + 1}, not {body.seed}")
    else:
        first = body.seed
    return [first + i for i in range(count)]


def generate_request(body: Txt2ImgRequest) -> GenerateRequest:
    """/generate's request for this A1111 request (its seed set per image later)."""
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt or None,
        "width": body.width,
        "height": body.height,
        "num_inference_steps": body.steps,
        "guidance_scale": float(body.cfg_scale),
        "scheduler": sampler(body),
    }
    if isinstance(body, Img2ImgRequest):
        if not body.init_images:
            raise InvalidRequest("init_images", "init_images needs one image (base64 PNG or JPEG)")
        if len(body.init_images) > 1:
            raise InvalidRequest("init_images", f"{len(body.init_images)} init_images given; one is supported")
        fields.update(init_image=body.init_images[0], strength=float(body.denoising_strength or 0.0))
        if body.mask is not None:
            fields.update(
                mask_image=body.mask,
                mask_blur=body.mask_blur if body.mask_blur is not None else body.mask_blur_x,
                mask_invert=bool(body.inpainting_mask_invert),
                inpaint_only_masked=body.inpaint_full_res,
                inpaint_padding=body.inpaint_full_res_padding,
                masked_content="fill" if body.inpainting_fill == 0 else "original",
            )
    try:
        return GenerateRequest.model_validate_json(json.dumps(fields))
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(part) for part in error.get("loc", ())]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidRequest):  # an image check names its field
            loc = [cause.field]
        field = FIELD_NAMES.get(loc[0], loc[0]) if loc else "body"
        message = str(error.get("msg", ""))
        for ours, theirs in FIELD_NAMES.items():
            message = message.replace(ours, theirs)
        raise InvalidRequest(field, f"{field}: {message}") from None


def parameters(body: Txt2ImgRequest) -> dict:
    """The request as A1111 echoes it (without the images)."""
    echoed = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        echoed.update(init_images=None, mask=None)
    return echoed


def info(body: Txt2ImgRequest, seeds_: list[int], scheduler_display: str, infotexts: list[str], model_id: str) -> str:
    """A1111's `info`: a JSON string."""
    count = len(seeds_)
    fields = {
        "prompt": body.prompt,
        "all_prompts": [body.prompt] * count,
        "negative_prompt": body.negative_prompt or "",
        "all_negative_prompts": [body.negative_prompt or ""] * count,
        "seed": seeds_[0],
        "all_seeds": seeds_,
        "subseed": seeds_[0],
        "all_subseeds": seeds_,
        "subseed_strength": 0,
        "width": body.width,
        "height": body.height,
        "sampler_name": scheduler_display,
        "cfg_scale": body.cfg_scale,
        "steps": body.steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "sd_model_name": model_name(model_id),
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": getattr(body, "denoising_strength", None),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
    }
    return json.dumps(fields)


def parse_infotext(text: str) -> dict:
    """A1111's `parse_generation_parameters` shape for our infotext, as app/infotext.py reads it: Prompt,
    Negative prompt, then each `Key: value` of the last line, Size also split into Size-1 and Size-2."""
    parsed = infotext.parse_infotext(text.strip())
    result: dict[str, Any] = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt or ""}
    for key, value in parsed.fields.items():
        if key == "Size" and "x" in value:
            result["Size-1"], result["Size-2"] = value.split("x", 1)
        result[key] = str(value)
    return result


# ---- /progress and /interrupt ---------------------------------------------------------------------------


class Task:
    """One txt2img/img2img request being served: its images' steps as A1111's progress reports them."""

    def __init__(self, job_count: int, owner: str | None = None):
        self.job_count = job_count
        self.owner = owner  # the caller's key name: another key's /progress and /interrupt do not see it
        self.job_no = 0  # the image being generated
        self.step = 0
        self.steps = 0
        self.preview = None  # the latest latent preview (an RGB uint8 array)
        self.interrupted = False
        self.started_at: float | None = None
        self.control: StepControl | None = None
        self._lock = threading.Lock()

    def next_control(self, job_no: int) -> StepControl:
        """The StepControl of image `job_no`: its steps are reported here, and an interrupt stops it."""
        with self._lock:
            self.job_no, self.step = job_no, 0
            self.control = StepControl(listener=self._on_step, preview_every=1, on_start=self._on_start)
            if self.interrupted:
                self.control.finish_early()
            return self.control

    def _on_start(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()

    def _on_step(self, step: int, steps: int, preview) -> None:
        self.step, self.steps = step, steps
        if preview is not None:
            self.preview = preview

    def interrupt(self) -> None:
        """The image being generated stops at its next step (its reply has the image reached); no more follow."""
        with self._lock:
            self.interrupted = True
            if self.control is not None:
                self.control.finish_early()

    @property
    def running(self) -> bool:
        return self.control is not None and self.control.started

    def report(self, with_image: bool) -> dict:
        done = (self.job_no + (self.step / self.steps if self.steps else 0.0)) / self.job_count
        elapsed = time.monotonic() - self.started_at if self.started_at is not None else 0.0
        image = None
        if with_image and self.preview is not None:
            image = base64.b64encode(png(Image.fromarray(self.preview))).decode("ascii")
        return {
            "progress": round(done, 4),
            "eta_relative": round(elapsed / done - elapsed, 3) if done > 0 else 0.0,
            "state": {"skipped": False, "interrupted": self.interrupted, "stopping_generation": False,
                      "job": f"task({self.job_no})", "job_count": self.job_count, "job_no": self.job_no,
                      "job_timestamp": "0", "sampling_step": self.step, "sampling_steps": self.steps},
            "current_image": image,
            "textinfo": None,
        }  # fmt: skip


class Progress:
    """The A1111 requests being served, oldest first: /progress reports the one that runs, /interrupt stops it."""

    def __init__(self):
        self._tasks: list[Task] = []
        self._lock = threading.Lock()

    def begin(self, job_count: int, owner: str | None = None) -> Task:
        task = Task(job_count, owner)
        with self._lock:
            self._tasks.append(task)
        return task

    def end(self, task: Task) -> None:
        with self._lock:
            self._tasks.remove(task)

    def current(self, owner: str | None = None) -> Task | None:
        """The oldest running request (else the oldest waiting one) of `owner`; None = of anyone."""
        with self._lock:
            tasks = [t for t in self._tasks if owner is None or t.owner == owner]
            running = [t for t in tasks if t.running]
            return running[0] if running else (tasks[0] if tasks else None)

    def report(self, with_image: bool = True, owner: str | None = None) -> dict:
        task = self.current(owner)
        if task is None:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None, "state": {
                "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_no": 0, "job_timestamp": "0", "sampling_step": 0, "sampling_steps": 0}}  # fmt: skip
        return task.report(with_image)

    def interrupt(self, owner: str | None = None) -> None:
        task = self.current(owner)
        if task is not None:
            task.interrupt()
