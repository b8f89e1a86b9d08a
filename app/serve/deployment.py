"""The Ray Serve application: an ingress that serves the same FastAPI app (routes, schemas, errors)
and `RAY_REPLICAS` generation replicas, each owning one engine, its LoRA cache and its queue.

    brand-image-serve                 # starts (or joins RAY_ADDRESS) Ray, serves on HOST:PORT
    serve run app.serve:app           # the same application with Ray's own CLI

The A/B store (SQLite) stays in the one ingress (num_replicas=1): its only writer.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from app.config import Settings, load_settings
from app.observability import configure_logging
from app.serve.board_actor import get_board
from app.serve.loopback import LOOPBACK, keep_serve_grpc_on_loopback
from app.serve.replica import GenerationReplica

logger = logging.getLogger(__name__)

APP_NAME = "brand-images"


@serve.ingress()
class Ingress:
    """Serves app.main's FastAPI app; its service and LoRA manager forward to the replicas."""

    def __init__(self, replicas, settings: Settings, app_name: str):
        from app.main import create_app
        from app.serve.remote import RemoteAppState, ReplicaMetricsCollector

        keep_serve_grpc_on_loopback()
        board = get_board(app_name)
        state = RemoteAppState.for_replicas(settings, board, replicas)
        self._app = create_app(settings, state)
        metrics = state.metrics
        # Per-replica series replace the in-process ones (the ingress runs no generation itself).
        metrics.registry.unregister(metrics.state_collector)
        metrics.registry.unregister(metrics.generation_seconds)
        metrics.registry.register(ReplicaMetricsCollector(board))

    def __serve_build_asgi_app__(self):
        return self._app


def replica_options(settings: Settings) -> dict:
    env = {}
    if settings.torch_threads:
        env["OMP_NUM_THREADS"] = str(settings.torch_threads)
    return {
        "num_replicas": settings.ray_replicas,
        "max_ongoing_requests": settings.ray_max_ongoing,
        "max_queued_requests": max(1, settings.max_queue_size) * settings.ray_replicas,
        "ray_actor_options": {
            "num_cpus": settings.ray_replica_cpus,
            "num_gpus": settings.ray_replica_gpus,
            "runtime_env": {"env_vars": env} if env else {},
        },
        "request_router_config": RequestRouterConfig(request_router_class="app.serve.router:LoraAffinityRouter"),
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": settings.shutdown_grace_s,
    }


def build_app(settings: Settings | None = None, app_name: str = APP_NAME):
    """The bound application; `serve.run(build_app(settings), name=app_name, route_prefix="/")`."""
    settings = settings or load_settings()
    replica = serve.deployment(GenerationReplica, name="GenerationReplica", **replica_options(settings))
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=1000)  # fmt: skip
    return ingress.bind(replica.bind(settings, app_name), settings, app_name)


def start_local_ray(settings: Settings) -> None:
    """A local Ray instance for this machine alone, unless RAY_BIND_HOST says otherwise.

    No dashboard (it accepts job submissions, i.e. code). On Linux `ray.init` turns 127.0.0.1 into the
    machine's outward IP and its servers listen on every interface; in its single-machine mode (the
    default on macOS and Windows, switched on by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) the node's
    address is the loopback one, and GCS, raylet, workers and agents listen on 127.0.0.1 only. The
    variable is set in the environment too, so the processes Ray starts see the same mode.
    """
    options: dict = {"include_dashboard": False}
    if settings.ray_bind_host in LOOPBACK:
        import ray._private.ray_constants as ray_constants

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    else:
        options["_node_ip_address"] = settings.ray_bind_host
    ray.init(**options)


def main() -> None:
    """Console entry (`brand-image-serve`): Ray (local, or RAY_ADDRESS), Serve on HOST:PORT, the app.

    SIGTERM or Ctrl-C: the application is deleted (each replica finishes its accepted requests, up to
    SHUTDOWN_GRACE_S), the local Ray instance stops, and the process exits 0."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    if settings.ray_address:
        ray.init(address=settings.ray_address)
    else:
        start_local_ray(settings)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs a handler that dumps the stack
        signal.signal(signum, lambda *_: stop.set())
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    logger.warning("serving on http://%s:%d with %d replicas", settings.host, settings.port, settings.ray_replicas)
    stop.wait()
    logger.warning("stopping: the replicas finish their accepted requests (up to %.0f s)", settings.shutdown_grace_s)
    # Only this application: on a shared cluster (RAY_ADDRESS) Serve and other applications stay up; a
    # local instance goes with ray.shutdown. (serve.shutdown would also work here, but it has the
    # controller kill itself under its own pending call, which Ray reports as a failed task.)
    serve.delete(APP_NAME)
    ray.shutdown()
    logger.warning("stopped")
