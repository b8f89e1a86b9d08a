"""The generation replica: one engine, its LoRA manager and its queue, loaded by app/state.py's
`AppState.load` exactly as the single-process service loads them, and `GenerationService.generate`
as the one request path. What crosses the process boundary: the spec and LoRA specs in; out, the
`GenerationOutcome` itself (`to_wire()`: every field, the image as its PNG; never tensors), or the
error's HTTP answer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import ray
from ray import serve

from app.api.errors import answer_for
from app.config import Settings
from app.jobs import GenerationSpec, LoraSpec, StepControl
from app.observability import ServiceMetrics, configure_logging
from app.serve.board import POLL_S
from app.serve.board_actor import get_board
from app.serve.loopback import keep_serve_grpc_on_loopback
from app.serve.routing import base_key
from app.state import AppState

logger = logging.getLogger(__name__)


class HeldSet:
    """What Ray's multiplexing keeps per routing key: only a label. The adapters themselves live in
    the LoRA manager's cache (LORA_CACHE_MAX_SIZE per replica, the same size as Ray's LRU of keys)."""

    def __init__(self, model_id: str):
        self.model_id = model_id


class GenerationReplica:
    def __init__(self, settings: Settings, app_name: str):
        configure_logging(settings.log_level, settings.log_format)
        keep_serve_grpc_on_loopback()
        self.settings = settings
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.state = AppState.for_settings(settings)
        self.state.metrics = ServiceMetrics(self.state)
        self.state.load()  # the single-process loader: engine, LoRA manager, preload, queue, service
        if self.state.load_error:
            raise RuntimeError(f"replica {self.replica_id}: {self.state.load_error}")

        async def hold(model_id: str) -> HeldSet:
            return HeldSet(model_id)

        # Ray reports the keys held here to every router, which sends a key's requests back to us.
        self._hold = serve.multiplexed(max_num_models_per_replica=settings.lora_cache_max_size)(hold)
        self._board = None
        self._controls: dict[str, StepControl] = {}  # the streamed requests here, by the ingress's request id
        self._app_name = app_name
        threading.Thread(target=self._serve_board, name="replica-board", daemon=True).start()
        logger.info("replica %s ready (%s on %s)", self.replica_id, settings.model_id, self.state.engine.device)

    # ---- the request path ----------------------------------------------------------------------

    async def generate(self, spec: GenerationSpec, loras: list[LoraSpec], strict: bool, slot: int | None = None):
        """`slot` is read by the router (app/serve/router.py), not here."""
        return await self._run(spec, loras, strict, StepControl())

    async def generate_stream(
        self,
        spec: GenerationSpec,
        loras: list[LoraSpec],
        strict: bool,
        slot: int | None = None,
        request_id: str = "",
        preview_every: int = 0,
    ):
        """`generate` for a caller that follows the steps (a job, an AUTOMATIC1111 request): called with
        `handle.options(stream=True)`, it yields `{"accepted": replica}` once the request is here (from
        then on a `finish` command with its `request_id` reaches it), then `{"step", "steps", "preview"}`
        after every denoising step (`preview`: None or the RGB uint8 array of app/engine/preview.py, every
        `preview_every` steps), and last the reply `generate` returns."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()

        def listener(step: int, total: int, preview) -> None:  # the generation thread
            loop.call_soon_threadsafe(steps.put_nowait, {"step": step, "steps": total, "preview": preview})

        control = StepControl(listener=listener, preview_every=preview_every)
        if request_id:
            self._controls[request_id] = control
        task = asyncio.ensure_future(self._run(spec, loras, strict, control))
        try:
            yield {"accepted": self.replica_id}
            while True:
                step = asyncio.ensure_future(steps.get())
                done, _ = await asyncio.wait({task, step}, return_when=asyncio.FIRST_COMPLETED)
                if step in done:
                    yield step.result()
                    continue
                step.cancel()
                while not steps.empty():
                    yield steps.get_nowait()
                yield task.result()
                return
        finally:
            self._controls.pop(request_id, None)
            if not task.done():  # the ingress canceled the stream: the loop stops at its next step
                control.cancel()
                task.cancel()

    async def _run(self, spec: GenerationSpec, loras: list[LoraSpec], strict: bool, control: StepControl) -> dict:
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._hold(model_id)
        try:
            outcome = await self.state.service.generate(spec, loras, strict, control=control)
        except asyncio.CancelledError:
            control.cancel()  # the ingress canceled (a job's DELETE, a client gone): the loop stops at its next step
            raise
        except Exception as exc:
            answer = answer_for(exc)
            if answer is None:
                raise
            return {"error": vars(answer), "replica": self.replica_id}
        return {"outcome": outcome.to_wire(), "replica": self.replica_id, "set_key": base_key(model_id)}

    async def load_adapter_check(self, path: str) -> None:
        """The engine's real loader on a file (LoRA uploads are checked by a replica: the ingress has no model)."""
        from pathlib import Path

        self.state.engine.load_adapter(Path(path))

    def check_health(self) -> None:
        """Serve's health check: a stalled generation worker (WATCHDOG_S) makes the replica unhealthy."""
        reason = self.state.not_ready_reason()
        if reason is not None and reason[0] == "stalled":
            raise RuntimeError(reason[1])

    def __del__(self):
        """Serve's graceful shutdown: leave the board at once instead of going stale."""
        board = getattr(self, "_board", None)
        if board is not None:
            try:
                board.unregister.remote(self.replica_id)
            except Exception:
                pass

    # ---- commands from the ingress (app/serve/board.py) ------------------------------------------

    def _info(self) -> dict:
        s = self.settings
        return {
            "device": str(self.state.engine.device),
            "cache_max_size": s.lora_cache_max_size,
            "preload": self.state.preload,
            "node": ray.get_runtime_context().get_node_id(),
        }

    def run_command(self, name: str, args: dict):
        loras = self.state.loras
        if name == "cache_stats":
            stats = loras.cache_stats().as_dict()
            return {**stats, "host": loras.host_stats(), "loads": loras.loads, "load_seconds": loras.load_seconds}
        if name == "clear_cache":
            return loras.clear_cache()
        if name == "remove":
            return loras.cache.remove(args["key"])
        if name == "metrics":
            from prometheus_client import generate_latest

            return generate_latest(self.state.metrics.registry).decode()
        if name == "info":
            return self._info()
        if name == "finish":  # AUTOMATIC1111's interrupt of a streamed request; another replica's id: nothing
            control = self._controls.get(args["request_id"])
            return control.finish_early() if control is not None else None
        raise ValueError(f"unknown command {name!r}")

    def _serve_board(self) -> None:
        after = None
        while True:
            try:
                if self._board is None:
                    self._board = get_board(self._app_name)
                    after = ray.get(self._board.register.remote(self.replica_id, self._info()))
                commands = ray.get(self._board.next_commands.remote(self.replica_id, after, POLL_S), timeout=POLL_S * 3)
                for command_id, name, args in commands:
                    after = max(after, command_id)
                    try:
                        result = self.run_command(name, args)
                    except Exception as exc:  # one bad command must not stop the loop
                        result = {"error": f"{type(exc).__name__}: {exc}"}
                    self._board.reply.remote(command_id, self.replica_id, result)
            except Exception as exc:  # the board restarted or is not up yet: find it again
                logger.debug("board unreachable (%s); retrying", exc)
                self._board = None
                time.sleep(1.0)
