"""A/B tests of LoRA weights: run a test, record the preferred variant, a brand's results, the web page."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from app.ab.contact_sheet import render_contact_sheet
from app.ab.plan import AbPlan, GridAxis, plan_grid, plan_variants
from app.ab.runner import AbOutcome, run_ab_test
from app.ab.store import AbHistoryEntry, AbTestRecord, UnknownTest, VariantOutOfRange, now_iso
from app.api.deps import AbStoreDep, RegistryDep, ServiceDep, SettingsDep
from app.api.prompt_loras import plan_with_tags
from app.api.schemas import (
    AbChoicePublic,
    AbChoiceRequest,
    AbImagePublic,
    AbResultsPublic,
    AbTestPublic,
    AbTestRequest,
    AbTestResponse,
    AbTestTimings,
    AbVariantPublic,
    AppliedLoraPublic,
    LoraConfig,
    Timings,
)
from app.errors import InvalidRequest
from app.lora.registry import ID_PATTERN
from app.service import draw_seed, encode_png, round_ms

router = APIRouter(tags=["ab-test"])

UI_PAGE = FilePath(__file__).resolve().parents[2] / "static" / "ab.html"
TestId = Annotated[str, Path(min_length=1, max_length=64)]
BrandId = Annotated[str, Path(pattern=ID_PATTERN.pattern)]


@router.post("/ab-test", response_model=AbTestResponse)
async def run_test(
    body: AbTestRequest, service: ServiceDep, settings: SettingsDep, store: AbStoreDep, request: Request
) -> AbTestResponse:
    seeds = body.seeds or [body.seed if body.seed is not None else draw_seed()]
    plan = plan_with_tags(_plan(body, seeds, settings.ab_max_variants), body.prompt)  # prompt tags in every variant
    service.check_limits(
        body.width, body.height, body.num_inference_steps, max(len(v.loras) for v in plan.variants)
    )
    spec = body.spec(seeds[0])
    outcome = await run_ab_test(service, plan, spec, strict=body.strict, disconnected=request.is_disconnected)
    sheet = await run_in_threadpool(_contact_sheet_png, plan, outcome)
    record = _record(uuid.uuid4().hex, body, plan, outcome)
    await run_in_threadpool(store.add_test, record)
    return _public(record.test_id, body, plan, outcome, sheet)


@router.get("/ab-test/{test_id}", response_model=AbTestPublic)
def get_test(test_id: TestId, store: AbStoreDep) -> AbTestPublic:
    test = store.get_test(test_id)
    if test is None:
        raise HTTPException(status_code=404, detail=str(UnknownTest(test_id)))
    return _test_public(AbHistoryEntry(test, store.choices(test_id)))


@router.post("/ab-test/{test_id}/choice", response_model=AbChoicePublic, status_code=201)
def record_choice(test_id: TestId, body: AbChoiceRequest, store: AbStoreDep) -> AbChoicePublic:
    try:
        choice = store.add_choice(test_id, body.variant, body.chosen_by, body.reason)
    except UnknownTest as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except VariantOutOfRange as exc:
        raise InvalidRequest("variant", str(exc)) from None
    return AbChoicePublic(**vars(choice))


@router.get("/lora/{brand_id}/ab-results", response_model=AbResultsPublic)
def brand_results(brand_id: BrandId, store: AbStoreDep, registry: RegistryDep) -> AbResultsPublic:
    history = store.history(brand_id)
    if not history and not registry.versions(brand_id):
        raise HTTPException(status_code=404, detail=f"brand {brand_id!r} has no LoRA files and no A/B tests")
    return AbResultsPublic(
        brand_id=brand_id,
        recommended_weight=store.recommended_weight(brand_id),
        data=[_test_public(entry) for entry in history],
        count=len(history),
    )


@router.get("/ui", include_in_schema=False)
def ui_page() -> FileResponse:
    return FileResponse(UI_PAGE, media_type="text/html")


# ---- request -> plan, outcome -> record and response ----------------------------------------------


def _plan(body: AbTestRequest, seeds: list[int], max_variants: int) -> AbPlan:
    if body.grid is not None:
        axes = [GridAxis(a.brand_id, tuple(a.weights), a.version, a.type) for a in body.grid]
        return plan_grid(axes, seeds, max_variants)
    variants = [[c.to_spec() for c in v.lora_configs] for v in body.variants]
    return plan_variants(variants, seeds, max_variants)


def _contact_sheet_png(plan: AbPlan, outcome: AbOutcome) -> bytes:
    cells = [[image.image for image in v.images] for v in outcome.variants]
    labels = [v.variant.label_lines for v in outcome.variants]
    sheet, _ = render_contact_sheet(cells, labels, plan.rows, plan.cols)
    return encode_png(sheet)


def _lora_configs(specs) -> list[dict]:
    return [{"brand_id": s.brand_id, "weight": s.weight, "version": s.version, "type": s.type} for s in specs]


def _record(test_id: str, body: AbTestRequest, plan: AbPlan, outcome: AbOutcome) -> AbTestRecord:
    settings = body.model_dump(exclude={"prompt", "seed", "seeds", "variants"}, exclude_none=True)
    settings["seeds"] = plan.seeds
    settings["mode"] = "grid" if body.grid is not None else "variants"
    variants = [
        {
            "index": v.variant.index,
            "label": v.variant.label,
            "lora_configs": _lora_configs(v.variant.loras),
            "loras": [vars(applied) for applied in v.applied],
            "seeds": [image.seed for image in v.images],
        }
        for v in outcome.variants
    ]
    return AbTestRecord(test_id, now_iso(), body.prompt, settings, variants)


def _public(test_id: str, body: AbTestRequest, plan: AbPlan, outcome: AbOutcome, sheet: bytes) -> AbTestResponse:
    b64 = lambda png: base64.b64encode(png).decode("ascii")  # noqa: E731
    variants = []
    warnings: list[str] = []
    for v in outcome.variants:
        first, *rest = v.images
        variants.append(
            AbVariantPublic(
                index=v.variant.index,
                label=v.variant.label,
                lora_configs=[LoraConfig(**c) for c in _lora_configs(v.variant.loras)],
                loras=[AppliedLoraPublic(**vars(applied)) for applied in v.applied],
                seed=first.seed,
                image=b64(first.png),
                timings=Timings(**first.timings()),
                warnings=v.warnings,
                extra_images=[
                    AbImagePublic(seed=i.seed, image=b64(i.png), timings=Timings(**i.timings())) for i in rest
                ],
            )
        )
        warnings += [w for w in v.warnings if w not in warnings]
    return AbTestResponse(
        test_id=test_id,
        seeds=plan.seeds,
        width=body.width,
        height=body.height,
        rows=plan.rows,
        cols=plan.cols,
        variants=variants,
        contact_sheet=b64(sheet),
        warnings=warnings,
        timings=AbTestTimings(lora_load_ms=round_ms(outcome.lora_load_ms), total_ms=round_ms(outcome.total_ms)),
    )


def _test_public(entry: AbHistoryEntry) -> AbTestPublic:
    t = entry.test
    return AbTestPublic(
        test_id=t.test_id,
        created_at=t.created_at,
        prompt=t.prompt,
        settings=t.settings,
        variants=t.variants,
        choices=[AbChoicePublic(**vars(c)) for c in entry.choices],
    )
