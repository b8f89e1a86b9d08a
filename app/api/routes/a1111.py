"""AUTOMATIC1111-compatible `/sdapi/v1/*` (docs/automatic1111.md): thin routes over app/api/a1111.py.

txt2img and img2img become /generate's request and go through `GenerationService.generate`, one call per
image with seeds seed, seed+1, ..., so image i is /generate's image with that seed.
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Request

from app.access import Caller
from app.api import a1111
from app.api.deps import CallerDep, RegistryDep, ServiceDep, SettingsDep
from app.api.routes.generate import lora_specs
from app.editing import decode_base64_image
from app.errors import InvalidRequest
from app.infotext import PNG_TEXT_KEY, model_name
from app.samplers import display_name
from app.service import draw_seed

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])


def _owner(caller: Caller) -> str | None:
    """Whose requests /progress and /interrupt see: a key sees its own; an admin key, or no keys, all."""
    return None if caller.is_admin else caller.name


async def _images(body: a1111.Txt2ImgRequest, service, request: Request, caller: Caller) -> dict:
    settings = service.settings
    a1111.refuse_unhonoured(body, settings.model_id)
    generate = a1111.generate_request(body)
    specs = lora_specs(generate)
    service.check_limits(generate.width, generate.height, generate.num_inference_steps, len(specs))
    seeds = a1111.seeds(body, draw_seed)
    images, infotexts = [], []
    task = _progress(request).begin(len(seeds), caller.name)
    try:
        for job_no, seed in enumerate(seeds):
            if task.interrupted and images:  # A1111's interrupt: the image reached is answered, no more follow
                break
            spec = generate.spec(seed)
            control = task.next_control(job_no)
            # strict: A1111's reply has no warnings, so a LoRA that cannot be applied is a 422, never left out.
            outcome = await service.generate(
                spec, specs, strict=True, disconnected=request.is_disconnected, control=control
            )
            images.append(outcome.image_base64)
            infotexts.append(outcome.infotext)
    finally:
        _progress(request).end(task)
    seeds = seeds[: len(images)]
    info = a1111.info(body, seeds, display_name(generate.scheduler), infotexts, settings.model_id)
    return {"images": images if body.send_images else [], "parameters": a1111.parameters(body), "info": info}


def _progress(request: Request) -> a1111.Progress:
    state = request.app.state
    if getattr(state, "a1111_progress", None) is None:
        state.a1111_progress = a1111.Progress()
    return state.a1111_progress


@router.get("/progress")
def progress(request: Request, caller: CallerDep, skip_current_image: bool = False) -> dict:
    """The running txt2img/img2img request: its step, its images, a preview; 0 and job_count 0 when idle."""
    return _progress(request).report(with_image=not skip_current_image, owner=_owner(caller))


@router.post("/interrupt")
def interrupt(request: Request, caller: CallerDep) -> None:
    """The running generation stops at its next step; its txt2img/img2img call answers with the image reached."""
    _progress(request).interrupt(owner=_owner(caller))


@router.post("/txt2img")
async def txt2img(request: Request, service: ServiceDep, caller: CallerDep) -> dict:
    body = a1111.parse(a1111.Txt2ImgRequest, await request.body())
    return await _images(body, service, request, caller)


@router.post("/img2img")
async def img2img(request: Request, service: ServiceDep, caller: CallerDep) -> dict:
    body = a1111.parse(a1111.Img2ImgRequest, await request.body())
    return await _images(body, service, request, caller)


@router.get("/samplers")
def samplers() -> list[dict]:
    return [{"name": name, "aliases": a1111.SAMPLER_ALIASES[name], "options": {}} for name in a1111.SAMPLERS]


@router.get("/schedulers")
def schedulers() -> list[dict]:
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": -1 if name == "automatic" else 7.0,
         "need_inner_model": False}
        for name, label in a1111.SCHEDULERS.items()
    ]  # fmt: skip


@router.get("/sd-models")
def sd_models(settings: SettingsDep) -> list[dict]:
    name = model_name(settings.model_id)
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": settings.model_id,
             "config": None}]  # fmt: skip


@router.get("/loras")
def loras(registry: RegistryDep, caller: CallerDep) -> list[dict]:
    """Each of the caller's brands as an A1111 LoRA: `<lora:NAME:W>` in a prompt applies it."""
    listed = []
    for brand_id in filter(caller.may_use, registry.brand_ids()):
        lora_file = registry.resolve(brand_id)
        if lora_file is None:
            continue
        metadata, _ = registry.metadata(lora_file)
        path = os.path.relpath(lora_file.path, os.path.realpath(registry.root))
        listed.append({"name": brand_id, "alias": brand_id, "path": path, "metadata": metadata or {}})
    return listed


@router.post("/refresh-loras")
def refresh_loras() -> None:
    """The LoRA folder is read on every request: nothing to refresh."""
    return None


def _options(settings) -> dict:
    return {
        "sd_model_checkpoint": model_name(settings.model_id),
        "sd_checkpoint_hash": None,
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "sd_vae": "Automatic",
        "eta_ancestral": 1.0,
        "eta_ddim": 0.0,
    }


@router.get("/options")
def get_options(settings: SettingsDep) -> dict:
    return _options(settings)


@router.post("/options")
async def set_options(request: Request, settings: SettingsDep) -> None:
    """Only what is already so may be "set" (tools set the model before they generate)."""
    try:
        changes = await request.json()
    except ValueError:
        raise InvalidRequest("body", "the body must be a JSON object of options") from None
    if not isinstance(changes, dict):
        raise InvalidRequest("body", "the body must be a JSON object of options")
    current = _options(settings)
    for key, value in changes.items():
        if key not in current or current[key] != value:
            shown = f"{key}={value!r}"
            raise InvalidRequest(
                key, f"{shown} cannot be set: this service serves one model with fixed options ({current})"
            )
    return None


@router.get("/scripts")
def scripts() -> dict:
    return {"txt2img": [], "img2img": []}


@router.post("/png-info")
async def png_info(request: Request) -> dict:
    try:
        payload = await request.json()
    except ValueError:
        raise InvalidRequest("image", "the body must be JSON with `image` (a base64 PNG)") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
        raise InvalidRequest("image", "`image` (a base64 PNG) is required")
    image = decode_base64_image(payload["image"], "image")
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    text = items.pop(PNG_TEXT_KEY, None)
    if text is None:
        return {"info": "", "items": items, "parameters": {}}
    return {"info": text, "items": items, "parameters": a1111.parse_infotext(text)}
