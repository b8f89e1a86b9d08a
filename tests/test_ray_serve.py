"""The Ray Serve application (app/serve/) on a local Ray instance: 2 CPU replicas, the embedded model,
one torch thread per replica. One cluster for the module (start ~30 s); the replica-kill test is last.

Skipped when ray is not installed (`pip install .[ray]`; scripts/setup.sh installs it).
"""

from __future__ import annotations

import base64
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from app.api.schemas import GenerateResponse  # noqa: E402
from app.lora.cache import LoraCache  # noqa: E402
from tests.conftest import pixels, ray_app, small_request, test_settings, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

CACHE = 3  # adapters per replica; a single cache of 2 x CACHE is the comparison
BRANDS = [f"brand-{i:02d}" for i in range(12)]
APP_NAME = "brand-images-test"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, make_brand):
    root = tmp_path_factory.mktemp("ray-loras")
    for i, brand in enumerate(BRANDS):
        make_brand(root, brand, seed=100 + i)
    return root


@pytest.fixture(scope="module")
def settings(model_cache_dir, lora_dir, tmp_path_factory):
    return test_settings(
        model_cache_dir, lora_dir, lora_cache_max_size=CACHE, torch_threads=1, data_dir=tmp_path_factory.mktemp("data"),
        ray_replicas=2, ray_replica_cpus=1, ray_hot_window=20, request_timeout_s=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cluster(settings):
    with ray_app(settings, APP_NAME, num_cpus=3) as client:
        yield client


LONG_STEPS = 50  # a generation of many steps: a request that is still running when the kill lands


def replica_queue_depths(client) -> dict[str, float]:
    """Each replica's generation_queue_depth (running + waiting), from /metrics (labelled by replica)."""
    depths = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('generation_queue_depth{replica="'):
            labels, value = line.rsplit(" ", 1)
            depths[labels.split('"')[1]] = float(value)
    return depths


def generate(client, brand: str | None = None, seed: int = 7, **fields):
    body = small_request(seed=seed, **fields)
    if brand is not None:
        body["brand_id"] = brand
    return client.post("/generate", json=body)


def replica_stats(client) -> dict[str, dict]:
    stats = client.get("/lora/cache/stats").json()
    assert len(stats["replicas"]) == 2, stats
    return stats["replicas"]


def test_ready_info_and_images_equal_the_single_process_service(cluster, make_client, lora_dir):
    assert cluster.get("/ready").json()["status"] == "ready"
    ray_base = generate(cluster, seed=11)
    ray_brand = generate(cluster, "brand-00", seed=12)
    assert ray_base.status_code == 200 and ray_brand.status_code == 200, ray_brand.text
    with make_client(lora_dir, lora_cache_max_size=CACHE) as local:
        local_base = generate(local, seed=11)
        local_brand = generate(local, "brand-00", seed=12)
    for remote, here in ((ray_base, local_base), (ray_brand, local_brand)):
        remote, here = remote.json(), here.json()
        assert remote["loras"] == here["loras"] and remote["warnings"] == here["warnings"]
        assert base64.b64decode(remote["image"]) == base64.b64decode(here["image"])  # byte-identical PNG
        assert (pixels(base64.b64decode(remote["image"])) == pixels(base64.b64decode(here["image"]))).all()


def test_replicas_run_torch_threads_threads(settings):
    """TORCH_THREADS reaches each replica: its OpenMP threads (OMP_NUM_THREADS, which Ray would otherwise
    set to the replica's CPUs) and torch's (the engine calls torch.set_num_threads with it)."""
    from app.serve.deployment import replica_options

    three = replica_options(settings.model_copy(update={"torch_threads": 3, "ray_replica_cpus": 1}))
    assert three["ray_actor_options"]["runtime_env"] == {"env_vars": {"OMP_NUM_THREADS": "3"}}
    assert replica_options(settings.model_copy(update={"torch_threads": 0}))["ray_actor_options"]["runtime_env"] == {}


def test_errors_keep_their_answers(cluster):
    strict = generate(cluster, "no-such-brand", strict=True)
    assert strict.status_code == 422 and strict.json()["detail"][0]["loc"] == ["body", "brand_id"]
    fallback = generate(cluster, "no-such-brand")
    assert fallback.status_code == 200 and "LoRA not found" in fallback.json()["warnings"][0]
    too_big = cluster.post("/generate", json=small_request(width=4096))
    assert too_big.status_code == 422


def test_affinity_repeat_requests_hit_the_replica_that_holds_the_brand(cluster):
    assert cluster.post("/lora/cache/clear").status_code == 200
    before = replica_stats(cluster)
    for brand in ("brand-01", "brand-02", "brand-01", "brand-02", "brand-01", "brand-02"):
        assert generate(cluster, brand).status_code == 200
    after = replica_stats(cluster)
    holders = {b: [r for r, s in after.items() if b in s["cached"]] for b in ("brand-01", "brand-02")}
    assert all(len(h) == 1 for h in holders.values()), holders  # each brand on exactly one replica
    assert holders["brand-01"] != holders["brand-02"]  # placement spreads new sets over the replicas
    hits = {r: after[r]["hits"] - before[r]["hits"] for r in after}
    misses = {r: after[r]["misses"] - before[r]["misses"] for r in after}
    assert sorted(hits.values()) == [2, 2] and sorted(misses.values()) == [1, 1], (hits, misses)
    metrics = cluster.get("/metrics").text
    for replica in after:  # every replica's series, labelled
        assert f'lora_cache_hits_total{{replica="{replica}"}} {float(after[replica]["hits"])}' in metrics
        assert f'generation_queue_depth{{replica="{replica}"}}' in metrics
    assert 'serve_generation_replicas{state="answering"} 2.0' in metrics


def zipf_sequence(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return rng.choices(BRANDS, weights=[1 / (i + 1) for i in range(len(BRANDS))], k=n)


def lru_hit_rate(sequence: list[str], size: int, assign) -> float:
    caches: dict[int, LoraCache] = {}
    for key in sequence:
        cache = caches.setdefault(assign(key), LoraCache(size))
        if cache.lookup(key) is None:
            cache.put(key, True)
    hits = sum(c.stats().hits for c in caches.values())
    return hits / len(sequence)


MEASURED: dict[str, float] = {}


def measure_zipf_hit_rate(client, sequence: list[str]) -> tuple[float, float, dict, dict]:
    assert client.post("/lora/cache/clear").status_code == 200
    before = replica_stats(client)
    started = time.perf_counter()
    for brand in sequence:
        assert generate(client, brand).status_code == 200
    elapsed = time.perf_counter() - started
    after = replica_stats(client)
    hits = sum(after[r]["hits"] - before[r]["hits"] for r in after)
    misses = sum(after[r]["misses"] - before[r]["misses"] for r in after)
    assert hits + misses == len(sequence)
    return hits / len(sequence), elapsed, before, after


def test_zipf_mix_affinity_hit_rate_is_close_to_one_cache_of_twice_the_size(cluster):
    sequence = zipf_sequence(90)
    affinity, elapsed, before, after = measure_zipf_hit_rate(cluster, sequence)
    MEASURED["affinity"] = affinity
    single = lru_hit_rate(sequence, 2 * CACHE, lambda key: 0)
    rng = random.Random(1)
    rand = lru_hit_rate(sequence, CACHE, lambda key: rng.randrange(2))
    print(
        f"\nZipf(1) over {len(BRANDS)} brands, {len(sequence)} requests, 2 replicas x cache {CACHE} "
        f"({elapsed:.1f} s):\n  affinity (measured) {affinity:.3f}\n  one cache of {2 * CACHE} (same sequence) "
        f"{single:.3f}\n  random routing (same sequence, simulated) {rand:.3f}\n  affinity / one cache "
        f"{affinity / single:.3f}"
    )
    assert affinity >= 0.9 * single
    # Both replicas did work, and the cache was cleared before: the first request of a brand missed.
    assert all(after[r]["misses"] > before[r]["misses"] for r in after)


def test_hot_brand_is_spread_over_both_replicas(cluster):
    assert cluster.post("/lora/cache/clear").status_code == 200
    for seed in range(16):
        assert generate(cluster, "brand-03", seed=seed).status_code == 200
    after = replica_stats(cluster)
    holders = [r for r, s in after.items() if "brand-03" in s["cached"]]
    assert len(holders) == 2, after  # a hot set is held by more than one replica


def total_queue_depth(client) -> float:
    """generation_queue_depth from /metrics: the one sample in-process, the sum of the replicas' under Ray."""
    lines = client.get("/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("generation_queue_depth"))


def test_every_field_of_a_reply_equals_the_single_process_reply_batched_too(cluster, make_client, lora_dir):
    """Three requests of one set: a long one, then two that wait behind it and share one denoising loop
    (batch_size 2). Ray's replies and the single process's have the same fields and values (timings:
    the same names): what crosses from a replica is the outcome itself (GenerationOutcome.to_wire)."""

    def three_requests(client) -> list[dict]:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(generate, client, "brand-05", seed=21, num_inference_steps=LONG_STEPS)
            wait_for(lambda: total_queue_depth(client) >= 1, "the long request to be accepted")
            pair = [pool.submit(generate, client, "brand-05", seed=seed) for seed in (22, 23)]
            wait_for(lambda: total_queue_depth(client) >= 3, "the pair to wait behind it")
            replies = [f.result(timeout=120) for f in (first, *pair)]
        assert [r.status_code for r in replies] == [200, 200, 200], [r.text for r in replies]
        return [r.json() for r in replies]

    from_ray = three_requests(cluster)
    with make_client(lora_dir, lora_cache_max_size=CACHE) as local:
        from_one_process = three_requests(local)
    assert [r["batch_size"] for r in from_ray] == [1, 2, 2]
    for remote, here in zip(from_ray, from_one_process, strict=True):
        assert set(remote) == set(here) == set(GenerateResponse.model_fields)
        assert set(remote["timings"]) == set(here["timings"])
        assert {k: v for k, v in remote.items() if k != "timings"} == {k: v for k, v in here.items() if k != "timings"}


def test_a_replica_killed_mid_run_retries_or_fails_clearly_and_nothing_hangs(cluster):
    from ray.util import list_named_actors

    actors = {a["name"].rsplit("#", 1)[1]: a["name"] for a in list_named_actors(all_namespaces=True)
              if "GenerationReplica" in a["name"]}  # fmt: skip
    assert len(actors) == 2, actors

    def one(i: int) -> int:
        return generate(cluster, BRANDS[i % 4], seed=i, num_inference_steps=LONG_STEPS).status_code

    started = time.perf_counter()
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, i) for i in range(12)]
        # Kill a replica once it holds at least two of them (one running, one waiting behind it): the
        # waiting one has a whole long generation ahead, so requests are surely in flight on it.
        busy = wait_for(lambda: [r for r, depth in replica_queue_depths(cluster).items() if depth >= 2 and r in actors],
                        "a replica with two requests")  # fmt: skip
        victim = ray.get_actor(actors[busy[0]], namespace="serve")
        ray.kill(victim, no_restart=True)
        killed_while_busy = not all(f.done() for f in futures)
        statuses = [f.result(timeout=180) for f in futures]  # nothing hangs
    elapsed = time.perf_counter() - started
    print(f"\nstatuses with a replica killed mid-run: {statuses} ({elapsed:.1f} s)")
    assert killed_while_busy
    assert set(statuses) <= {200, 503}, statuses  # retried on the survivor, or a clear 503; never a 500
    assert statuses.count(200) >= len(statuses) // 2
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(victim.__ray_ready__.remote(), timeout=30)
    # The survivor keeps serving.
    assert generate(cluster, "brand-00", seed=99).status_code == 200


def test_random_routing_row_on_the_same_zipf_mix(cluster, settings):
    """The comparison row, measured: the same app redeployed with RAY_ROUTING=random (Ray's default)."""
    from app.serve.deployment import build_app

    serve.run(build_app(settings.model_copy(update={"ray_routing": "random"}), APP_NAME), name=APP_NAME,
              route_prefix="/")  # fmt: skip
    deadline = time.monotonic() + 120
    while len(cluster.get("/lora/cache/stats").json().get("replicas", {})) != 2:
        assert time.monotonic() < deadline, "the redeployed app never got its 2 replicas"
        time.sleep(0.5)
    sequence = zipf_sequence(90)
    rand, elapsed, _, _ = measure_zipf_hit_rate(cluster, sequence)
    single = lru_hit_rate(sequence, 2 * CACHE, lambda key: 0)
    print(f"\nrandom routing (measured) {rand:.3f} vs affinity (measured) {MEASURED.get('affinity', float('nan')):.3f} "
          f"vs one cache of {2 * CACHE} {single:.3f} ({elapsed:.1f} s)")  # fmt: skip
    assert rand < single
