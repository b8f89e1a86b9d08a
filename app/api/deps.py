"""FastAPI dependencies that hand routes the app's state and services."""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import Depends, Request

from app.ab.store import AbStore
from app.access import OPEN_CALLER, Caller
from app.config import Settings
from app.errors import ServiceUnavailable
from app.lora.catalog import LoraCatalog
from app.lora.manager import LoraManager
from app.lora.registry import LoraRegistry
from app.service import GenerationService
from app.state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.service_state


def _require_ready(state: AppState) -> None:
    """New work needs a loaded model and a service that is not shutting down (a stalled worker still
    queues: /ready tells load balancers to go elsewhere)."""
    reason = state.not_ready_reason()
    if reason is not None and reason[0] != "stalled":
        raise ServiceUnavailable(reason[1])


def get_service(state: Annotated[AppState, Depends(get_state)]) -> GenerationService:
    _require_ready(state)
    return state.service


def get_loras(state: Annotated[AppState, Depends(get_state)]) -> LoraManager:
    """The LoRA manager, for operations: available while draining, not before the model is loaded."""
    if state.loras is None:
        raise ServiceUnavailable(state.not_ready_reason()[1])
    return state.loras


StateDep = Annotated[AppState, Depends(get_state)]
ServiceDep = Annotated[GenerationService, Depends(get_service)]
LorasDep = Annotated[LoraManager, Depends(get_loras)]


def get_settings_dep(state: StateDep) -> Settings:
    return state.settings


def get_registry(state: StateDep) -> LoraRegistry:
    return state.registry


def get_catalog(state: StateDep) -> LoraCatalog:
    return state.catalog


_ab_store_lock = threading.Lock()


def get_ab_store(state: StateDep) -> AbStore:
    """The A/B store, opened on first use (it works while the model is still loading)."""
    if state.ab_store is None:
        with _ab_store_lock:
            if state.ab_store is None:
                state.ab_store = AbStore.in_dir(state.settings.data_dir)
    return state.ab_store


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
AbStoreDep = Annotated[AbStore, Depends(get_ab_store)]
CatalogDep = Annotated[LoraCatalog, Depends(get_catalog)]
RegistryDep = Annotated[LoraRegistry, Depends(get_registry)]


def get_caller(request: Request) -> Caller:
    """Who is calling (app/api/security.py made it of the key); reads are filtered to its brands."""
    return request.scope.get("app.caller") or OPEN_CALLER


CallerDep = Annotated[Caller, Depends(get_caller)]
