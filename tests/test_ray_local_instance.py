"""`brand-image-serve` as a user runs it: a subprocess that starts its own local Ray instance.

- Nothing it starts listens beyond 127.0.0.1 (RAY_BIND_HOST's default): not the GCS, raylet, workers,
  agents, Serve's proxy or the replicas' gRPC servers; and no dashboard.
- Four LoRA sets in round robin on 2 replicas x LORA_CACHE_MAX_SIZE 2: after the first round, every
  request is a hit (each replica holds two sets; no set is copied).
- SIGTERM: it exits 0, without a stack dump or a failed graceful shutdown.

Skipped when ray is not installed. One Ray instance, 2 CPU replicas of the embedded model (~40 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
httpx = pytest.importorskip("httpx")

from app.config import PROJECT_ROOT, Settings  # noqa: E402
from tests.conftest import free_port, small_request  # noqa: E402

pytestmark = pytest.mark.slow

SETS = ["set-a", "set-b", "set-c", "set-d"]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, make_brand):
    work = tmp_path_factory.mktemp("brand-image-serve")
    for i, brand in enumerate(SETS):
        make_brand(work / "loras", brand, seed=300 + i)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "MODEL_CACHE_DIR": str(Settings.model_fields["model_cache_dir"].default),
        "LORA_BASE_DIR": str(work / "loras"),
        "DATA_DIR": str(work / "data"),
        "DEVICE": "cpu",
        "DTYPE": "float32",
        "LOG_LEVEL": "warning",
        "PORT": str(port),
        "RAY_ADDRESS": "",  # a local instance, whatever the caller's environment says
        "RAY_BIND_HOST": "127.0.0.1",
        "RAY_REPLICAS": "2",
        "RAY_REPLICA_CPUS": "1",
        "LORA_CACHE_MAX_SIZE": "2",
        "LORA_PRELOAD_BRANDS": "",
        "TORCH_THREADS": "1",
        "SHUTDOWN_GRACE_S": "10",
    }
    log_path = work / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", "from app.serve import main; main()"],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, (
            f"brand-image-serve exited ({process.returncode}):\n{log_path.read_text()[-3000:]}"
        )
        try:
            ready = client.get("/ready")
            if ready.status_code == 200 and len(ready.json()["preload"]) == 2:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"brand-image-serve never became ready:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.5)
    yield process, client, log_path
    client.close()
    if process.poll() is None:
        process.kill()
        process.wait(30)


def listening(process) -> dict[tuple[str, int], str]:
    """(address, port) -> process name, for every listening socket of the process and its descendants."""
    root = psutil.Process(process.pid)
    sockets = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.NoSuchProcess:
            continue
        for c in connections:
            if c.status == psutil.CONN_LISTEN:
                sockets[(c.laddr.ip, c.laddr.port)] = name
    return sockets


def test_everything_ray_starts_listens_on_loopback_only(served):
    process, client, _ = served
    sockets = listening(process)
    assert len({name for name in sockets.values()}) >= 4, sockets  # GCS, raylet, workers, agents: really looked
    exposed = {address: name for address, name in sockets.items() if address[0] not in LOOPBACK}
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"
    assert not any(port == 8265 for _, port in sockets), "the Ray dashboard is on"


def test_four_sets_round_robin_on_two_replicas_of_cache_two_all_hit_after_the_first_round(served):
    _, client, _ = served
    assert client.post("/lora/cache/clear").status_code == 200

    def counts() -> tuple[int, int]:
        stats = client.get("/lora/cache/stats").json()
        assert len(stats["replicas"]) == 2, stats
        return stats["hits"], stats["misses"]

    before = counts()
    for i, brand in enumerate(SETS):
        assert client.post("/generate", json=small_request(brand_id=brand, seed=i)).status_code == 200
    first_round = counts()
    for round_ in range(4):
        for i, brand in enumerate(SETS):
            reply = client.post("/generate", json=small_request(brand_id=brand, seed=10 + 4 * round_ + i))
            assert reply.status_code == 200, reply.text
    after = counts()
    assert (first_round[0] - before[0], first_round[1] - before[1]) == (0, 4)
    assert (after[0] - first_round[0], after[1] - first_round[1]) == (16, 0)  # 16 hits, 0 misses
    per_replica = client.get("/lora/cache/stats").json()["replicas"]
    assert sorted(sorted(s["cached"]) for s in per_replica.values()) in (
        [["set-a", "set-c"], ["set-b", "set-d"]],
        [["set-a", "set-d"], ["set-b", "set-c"]],
        [["set-a", "set-b"], ["set-c", "set-d"]],
    ), per_replica  # two sets on each replica, none on both


def test_sigterm_exits_zero_without_a_stack_dump(served):
    process, client, log_path = served
    assert client.get("/ready").status_code == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(120) == 0, log_path.read_text()[-3000:]
    log = log_path.read_text()
    for scary in ("SIGTERM received", "Traceback", "graceful_shutdown failed", "killed by ray.kill"):
        assert scary not in log, f"{scary!r} in the output:\n{log[-3000:]}"
    assert "stopped" in log
