"""The ingress's side of the Ray application: objects with the interfaces the routes already use
(`GenerationService`, `LoraManager`, `AppState`), backed by the replicas.

- `RemoteGenerationService._generate(spec, loras, strict, disconnected)` (after the base class's
  `generate` made the caller's brand and quota checks, here at the ingress) resolves the LoRA set's key
  through the registry (torch-free), picks the routing key (hot sets get copies), and awaits the
  replica handle with `multiplexed_model_id=<routing key>`; the replica runs the real
  `GenerationService.generate`. A/B tests use `acquire`/`render` as in-process: each variant is a
  `generate` on the replica that holds its set. With a `StepControl` (a job, an A1111 request), the call
  streams (`generate_stream`): the replica's steps and previews are reported to the control as they
  come, `cancel()` cancels the Ray request, and `finish_early()` (A1111's interrupt) is sent to the
  replica as a `finish` command over the board, keyed by the request id the ingress made.
- `RemoteLoraManager`: cache stats, clear and removals fan out to every replica (app/serve/board.py);
  the totals keep `/lora/cache/stats`' schema, `replicas` adds each replica's own numbers.
- `ReplicaMetricsCollector`: `/metrics` carries every replica's series with a `replica` label.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import ray
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from app.config import Settings
from app.errors import AnsweredError, ClientGone, JobCanceled, QueueFull, QueueTimeout, ServiceUnavailable
from app.jobs import GenerationSpec, LoraSpec, StepControl
from app.lora.cache import CacheStats
from app.observability import record_image
from app.serve.routing import AffinityPlanner, lora_set_key
from app.service import Disconnected, GenerationOutcome, GenerationService, lora_name
from app.state import AppState

logger = logging.getLogger(__name__)

REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)
POLL_S = 0.25


class RemoteQueue:
    """The ingress holds no queue: each replica bounds its own (MAX_QUEUE_SIZE, 429 when full), and
    Serve bounds what waits for a replica (max_queued_requests). A/B tests take places here as usual."""

    depth = 0
    closed = False

    def reserve(self) -> None:
        pass

    def release_reservation(self) -> None:
        pass

    async def wait_for_place(self, disconnected: Disconnected = None) -> None:
        pass

    def stalled_for(self) -> None:
        return None

    def shutdown(self) -> None:
        pass


@dataclass
class RemoteAcquired:
    """An A/B test's LoRAs in Ray mode: the replica that renders each variant acquires them."""

    specs: list[LoraSpec]
    strict: bool
    load_ms: float = 0.0


@dataclass
class RemoteOutcome(GenerationOutcome):
    """The replica's outcome (`GenerationOutcome.to_wire` / `from_wire`: every field crosses) and where it ran."""

    replica: str = ""
    routing_key: str = ""


class RemoteGenerationService(GenerationService):
    def __init__(self, settings: Settings, registry, handle, metrics=None, board=None):
        super().__init__(settings, loras=None, queue=RemoteQueue(), metrics=metrics)
        self.registry = registry
        self.handle = handle
        self.board = board  # app/serve/board.py's actor: how an interrupt reaches the replica
        self.planner = AffinityPlanner(settings.ray_replicas, settings.ray_hot_window, settings.ray_hot_margin)

    def routing_key(self, loras: Sequence[LoraSpec]) -> tuple[str, int | None]:
        if self.settings.ray_routing != "affinity":
            return "", None  # Ray's default: any replica
        return self.planner.route(lora_set_key(self.registry, loras))

    async def _generate(
        self,
        spec: GenerationSpec,
        loras: Sequence[LoraSpec],
        strict: bool = False,
        disconnected: Disconnected = None,
        control: StepControl | None = None,
    ) -> RemoteOutcome:
        """`control` (a job's, an AUTOMATIC1111 request's): started when the request goes to a replica; the
        replica's steps are reported to it as they happen (`_call` streams), its `cancel()` cancels the
        replica's request (which stops a running loop at its next step), and its `finish_early()` reaches the
        replica, which stops at its next step and answers with the image reached."""
        start = time.perf_counter()
        key, slot = self.routing_key(loras)
        attempts = self.settings.ray_retries + 1
        if control is not None:
            control.start()
        for attempt in range(attempts):
            try:
                reply = await self._call(key, slot, spec, list(loras), strict, disconnected, control)
                break
            except REPLICA_LOST as exc:
                # The image is a pure function of the request (seeded), so running it again is safe.
                logger.warning("replica lost while serving a request (attempt %d of %d): %s", attempt + 1, attempts,
                               type(exc).__name__)  # fmt: skip
                if attempt + 1 == attempts:
                    raise ServiceUnavailable(
                        f"the generation replica serving this request stopped ({type(exc).__name__}) and "
                        f"{self.settings.ray_retries} retries on other replicas failed; retry shortly"
                    ) from None
        if "error" in reply:
            raise AnsweredError(**reply["error"])
        outcome = RemoteOutcome.from_wire(reply["outcome"], replica=reply["replica"], routing_key=key)
        outcome.total_ms = (time.perf_counter() - start) * 1000  # the ingress's wall time: routing and retries too
        # The cache keys, as the in-process access log names them (`acme`, `globex@v2`).
        brands = [lora_name(a) for a in outcome.loras if a.weight != 0.0]
        record_image(brands, outcome.queue_ms, outcome.lora_ms, outcome.generation_ms)
        return outcome

    async def _call(
        self, key: str, slot: int | None, spec, loras, strict, disconnected: Disconnected, control=None
    ) -> dict:
        """The replica's reply. With a `control`, the call streams (the replica's `generate_stream`): each step
        is reported to the control as it happens, and a `finish_early()` asked here reaches the replica."""
        handle = self.handle.options(multiplexed_model_id=key) if key else self.handle
        accepted = asyncio.Event()
        request_id = uuid.uuid4().hex
        try:
            if control is None:
                response = handle.generate.remote(spec, loras, strict, slot=slot)
                task = asyncio.ensure_future(_await(response))
            else:
                response = handle.options(stream=True).generate_stream.remote(
                    spec, loras, strict, slot=slot, request_id=request_id, preview_every=control.preview_every
                )
                task = asyncio.ensure_future(_follow(response, control, accepted))
        except BackPressureError as exc:
            raise QueueFull(self.settings.max_queue_size, 5) from exc
        deadline = time.perf_counter() + self.settings.request_timeout_s + 60
        finish_sent = False
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return task.result()
                if disconnected is not None and await disconnected():
                    raise ClientGone()
                if control is not None and control.discarded:
                    raise JobCanceled()
                if control is not None and control.stop_mode == "finish" and accepted.is_set() and not finish_sent:
                    self._finish(request_id)
                    finish_sent = True
                if time.perf_counter() > deadline:
                    raise QueueTimeout("no generation replica answered in time")
        except BackPressureError as exc:
            raise QueueFull(self.settings.max_queue_size, 5) from exc
        except RequestCancelledError:
            raise ClientGone() from None
        finally:
            if not task.done():
                response.cancel()  # the replica drops the job if it has not started, or stops its loop
                task.cancel()

    def _finish(self, request_id: str) -> None:
        """Tell the replica running `request_id` to stop at its next step and return the image reached (the
        board reaches every replica; the others do not know the id). Not awaited: the stream answers."""
        if self.board is not None:
            self.board.broadcast.remote("finish", {"request_id": request_id}, 5.0)

    async def _acquire(self, loras: Sequence[LoraSpec], strict: bool = False) -> RemoteAcquired:
        # Strict mode must fail before any image; the file checks run on the replica, so only
        # existence is checked here (a file that fails to load is refused on its first variant).
        if strict:
            for spec in loras:
                if self.registry.resolve(spec.brand_id, spec.version) is None:
                    from app.errors import LoraUnavailable

                    raise LoraUnavailable(spec.brand_id, "no LoRA file for this brand (or version)")
        return RemoteAcquired(list(loras), strict)

    async def render(self, spec, acquired, loras, disconnected=None, start=None) -> RemoteOutcome:
        outcome = await self._generate(spec, loras, acquired.strict, disconnected)  # admitted at `acquire`
        acquired.load_ms += outcome.lora_ms
        return outcome


async def _await(response):
    return await response


async def _follow(response, control: StepControl, accepted: asyncio.Event) -> dict:
    """A replica's `generate_stream`: its steps to `control` (the job's or the A1111 request's listener), then
    its reply."""
    async for item in response:
        if "step" in item:
            control.report(item["step"], item["steps"], item["preview"])
        elif "accepted" in item:
            accepted.set()
        else:
            return item
    raise RuntimeError("the replica's stream ended without a reply")


# ---- every replica at once ------------------------------------------------------------------------


class _CacheProxy:
    def __init__(self, manager: RemoteLoraManager):
        self.manager = manager

    def remove(self, key: str) -> bool:
        replies = self.manager.broadcast("remove", {"key": key})["replies"]
        return any(r is True for r in replies.values())


class _EngineProxy:
    """Upload checks need the engine's real loader: one replica runs it on the shared LoRA folder."""

    def __init__(self, handle):
        self.handle = handle

    def load_adapter(self, path) -> None:
        try:
            self.handle.load_adapter_check.remote(str(path)).result(timeout_s=120)
        except ray.exceptions.RayTaskError as exc:
            raise (exc.cause if getattr(exc, "cause", None) is not None else exc) from None


@dataclass
class _CachedFanOut:
    at: float = 0.0
    value: dict = field(default_factory=dict)


class RemoteLoraManager:
    """The LoRA manager's operations interface over every replica (one LoRA folder, shared)."""

    def __init__(self, settings: Settings, registry, facts, board, handle):
        self.settings = settings
        self.registry = registry
        self.facts = facts
        self.board = board
        self.engine = _EngineProxy(handle)
        self.cache = _CacheProxy(self)
        self._recent = _CachedFanOut()

    def broadcast(self, name: str, args: dict | None = None, timeout: float = 10.0) -> dict:
        return ray.get(self.board.broadcast.remote(name, args or {}, timeout), timeout=timeout + 5)

    def replica_stats(self) -> dict[str, dict]:
        answer = self.broadcast("cache_stats")
        stats = {rid: s for rid, s in answer["replies"].items() if isinstance(s, dict) and "hits" in s}
        self._recent = _CachedFanOut(time.monotonic(), stats)
        return stats

    def cache_stats(self) -> CacheStats:
        per_replica = self.replica_stats()
        return MergedCacheStats.merge(self.settings, per_replica)

    def host_stats(self) -> dict | None:
        """The replicas' host tiers together (None when they have none)."""
        tiers = [s["host"] for s in self.replica_stats().values() if s.get("host")]
        if not tiers:
            return None
        hits, misses = sum(t["hits"] for t in tiers), sum(t["misses"] for t in tiers)
        cached: list[str] = []
        for t in tiers:
            cached += [k for k in t["cached"] if k not in cached]
        return {
            "max_mb": sum(t["max_mb"] for t in tiers),
            "used_mb": sum(t["used_mb"] for t in tiers),
            "size": sum(t["size"] for t in tiers),
            "cached": cached,
            "hits": hits,
            "misses": misses,
            "evictions": sum(t["evictions"] for t in tiers),
            "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        }

    def clear_cache(self) -> int:
        return sum(n for n in self.broadcast("clear_cache")["replies"].values() if isinstance(n, int))

    def resident_adapters(self) -> list[str]:
        return sorted({key for s in self.replica_stats().values() for key in s["cached"]})

    def is_cached(self, lora_file) -> bool:
        if time.monotonic() - self._recent.at > 1.0:
            self.replica_stats()
        return any(lora_file.key in s["cached"] for s in self._recent.value.values())

    @property
    def loads(self) -> int:
        return sum(s.get("loads", 0) for s in self._recent.value.values())

    @property
    def load_seconds(self) -> float:
        return sum(s.get("load_seconds", 0.0) for s in self._recent.value.values())


@dataclass(frozen=True)
class MergedCacheStats(CacheStats):
    """Totals over the replicas (max_size: their capacity together), plus each replica's stats."""

    replicas: dict = field(default_factory=dict)

    @classmethod
    def merge(cls, settings: Settings, per_replica: dict[str, dict]) -> MergedCacheStats:
        cached: list[str] = []
        pinned: list[str] = []
        for s in per_replica.values():
            cached += [k for k in s["cached"] if k not in cached]
            pinned += [k for k in s["pinned"] if k not in pinned]
        hits = sum(s["hits"] for s in per_replica.values())
        misses = sum(s["misses"] for s in per_replica.values())
        return cls(
            enabled=settings.lora_cache_enabled,
            max_size=sum(s["max_size"] for s in per_replica.values()),
            size=sum(s["size"] for s in per_replica.values()),
            cached=cached,
            pinned=sorted(pinned),
            hits=hits,
            misses=misses,
            evictions=sum(s["evictions"] for s in per_replica.values()),
            hit_rate=hits / (hits + misses) if hits + misses else 0.0,
            replicas={rid: {k: v for k, v in s.items() if k in CACHE_FIELDS} for rid, s in sorted(per_replica.items())},
        )


CACHE_FIELDS = {f.name for f in dataclasses.fields(CacheStats)}


class ReplicaMetricsCollector:
    """Every replica's metrics (queue depth, generation latency, LoRA cache and loads), labelled
    `replica`, read through the board when /metrics is scraped."""

    def __init__(self, board):
        self.board = board

    def describe(self):
        return []  # registering must not trigger a fan-out

    def collect(self):
        try:
            answer = ray.get(self.board.broadcast.remote("metrics", {}, 5.0), timeout=10)
        except Exception as exc:  # the scrape still gets the ingress's own metrics
            logger.warning("replica metrics unavailable: %s", exc)
            return
        families: dict[str, Metric] = {}
        for replica_id, text in sorted(answer["replies"].items()):
            if not isinstance(text, str):
                continue
            for family in text_string_to_metric_families(text):
                if family.name.startswith("http_"):
                    continue  # replicas serve no HTTP: the ingress counts requests
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "replica": replica_id}, sample.value)
        replicas = Metric("serve_generation_replicas", "Generation replicas answering, and missing", "gauge")
        replicas.add_sample("serve_generation_replicas", {"state": "answering"}, len(answer["replies"]))
        replicas.add_sample("serve_generation_replicas", {"state": "missing"}, len(answer["missing"]))
        yield replicas
        yield from families.values()


@dataclass
class RemoteAppState(AppState):
    """The ingress's state: the registry, catalog and A/B store as usual; no engine. Ready while at
    least one replica is up."""

    board: object = None
    replica_handle: object = None
    _live: _CachedFanOut = field(default_factory=_CachedFanOut)

    @classmethod
    def for_replicas(cls, settings: Settings, board, handle) -> RemoteAppState:
        state = cls.for_settings(settings)
        state.board, state.replica_handle = board, handle
        state.queue = RemoteQueue()
        state.loras = RemoteLoraManager(settings, state.registry, state.facts, board, handle)
        state.service = RemoteGenerationService(settings, state.registry, handle, board=board)
        return state

    def live_replicas(self) -> dict[str, dict]:
        if time.monotonic() - self._live.at > 1.0:
            try:
                self._live = _CachedFanOut(time.monotonic(), ray.get(self.board.live.remote(), timeout=5))
            except Exception as exc:
                logger.warning("replica board unreachable: %s", exc)
                self._live = _CachedFanOut(time.monotonic(), {})
        return self._live.value

    @property
    def ready(self) -> bool:
        return bool(self.live_replicas())

    def wait_ready(self, timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout or 0)
        while not self.ready and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.ready

    def not_ready_reason(self):
        if self.draining:
            return "draining", "the service is shutting down"
        if not self.ready:
            return "loading", "no generation replica is up yet; retry shortly"
        return None

    @property
    def preload(self) -> dict:
        replicas = self.live_replicas()
        return {rid: info.get("preload", {}) for rid, info in replicas.items()}

    @preload.setter
    def preload(self, value) -> None:
        pass

    def start(self) -> None:
        self.draining = False

    def busy(self) -> int:
        return 0
