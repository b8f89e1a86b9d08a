"""`python -m bench.http`: the service measured from outside, over HTTP, against a real uvicorn process.

    python -m bench.http miss                      # what a cache miss costs a request (sd15-random shapes)
    python -m bench.http zipf --clients 8          # images/s of a Zipf mix of brands from N client threads
    python -m bench.http zipf --device cuda --preset sd15-random --size 512 --steps 20   # on a GPU
    python -m bench.http batch --clients 8         # images/s with BATCH_MAX_SIZE 1, 4, 8: one brand, 8 brands

`miss`: two brands are preloaded (pinned) and alternated: every such request switches adapters but
reads no file. Fresh brands, each asked for once with the LRU at one place and the host tier off,
are cold misses: header gate, file read, conversion (the file's hash is known from the service's
start-up pass, as for any brand on disk). The two kinds alternate, and the miss cost is the median
of each miss's time minus the switch just before it: a request takes ~2 s on a CPU and drifts by
+-100 ms over a run, which a difference of the two kinds' medians does not cancel.

Prints a table and writes JSON to bench/results/<name>.json. It measures; it does not assert.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.loras import LoraShape, write_brands
from bench.models import PRESETS, model_id_for
from bench.report import machine, percentile, write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("miss", "zipf", "batch"))
    p.add_argument("--preset", choices=PRESETS, default=None, help="default: sd15-random for miss, tiny for zipf")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="default: 1 for miss, 4 for zipf")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--requests", type=int, default=12, help="miss: per kind; zipf: in all")
    p.add_argument("--block", type=int, default=None, help="requests per kind per interleaving round (miss 1, zipf 10)")
    p.add_argument("--warmup", type=int, default=20, help="zipf: untimed mix requests first (after one per brand)")
    p.add_argument("--clients", type=int, default=1, help="zipf: client threads")
    p.add_argument("--brands", type=int, default=20, help="zipf: brands in the mix")
    p.add_argument("--cache", type=int, default=5, help="zipf: LORA_CACHE_MAX_SIZE")
    p.add_argument(
        "--host-cache-mb", type=int, default=None, help="LORA_HOST_CACHE_MB (default: miss 0, else the service default)"
    )
    p.add_argument("--batch", type=int, default=None, help="BATCH_MAX_SIZE for the server")
    p.add_argument("--batches", default="1,4,8", help="batch: the BATCH_MAX_SIZE values to compare")
    p.add_argument("--zipf-s", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None, help="TORCH_THREADS for the server")
    p.add_argument("--env", action="append", default=[], help="extra VAR=VALUE for the server")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--name", help="results file name")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, env: dict[str, str], work: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(work / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **env, "PYTHONPATH": str(PROJECT_ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning", "--no-access-log"],
            cwd=work, env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 900
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited: {(work / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server was not ready in 15 minutes")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def request(client: httpx.Client, url: str, body: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    response = client.post(f"{url}/generate", json=body, timeout=600)
    elapsed = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        raise SystemExit(f"request failed: {response.status_code} {response.text[:500]}")
    return elapsed, response.json()


def server_env(args, model_id: str, lora_root: Path, **extra) -> dict[str, str]:
    env = {
        "MODEL_ID": model_id, "MODEL_CACHE_DIR": str(args.cache_dir), "DEVICE": args.device,
        "LORA_BASE_DIR": str(lora_root), "LOG_LEVEL": "warning", "MAX_QUEUE_SIZE": "256",
        "LORA_HOST_CACHE_MB": str(args.host_cache_mb), "MAX_BODY_BYTES": str(1 << 20),
    }  # fmt: skip
    if args.threads:
        env["TORCH_THREADS"] = str(args.threads)
    if args.batch is not None:
        env["BATCH_MAX_SIZE"] = str(args.batch)
    env.update({k: str(v) for k, v in extra.items()})
    env.update(dict(item.split("=", 1) for item in args.env))
    return env


def write_loras(args, model_id: str, lora_root: Path, names: list[str]) -> LoraShape:
    from diffusers import StableDiffusionPipeline

    from app.config import Settings
    from app.engine.loading import model_source

    source = model_source(Settings(model_id=model_id, model_cache_dir=args.cache_dir))
    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    shape = LoraShape(rank=args.rank)
    write_brands(lora_root, pipe, names, shape, seed=7)
    return shape


def run_miss(args, model_id: str, work: Path) -> dict:
    steps = args.steps or 1
    args.block = args.block or 1
    rounds = -(-args.requests // args.block)
    warmup_rounds = 4  # the first seconds after start-up run slower (page cache, the start-up hash pass)
    fresh = [f"miss-{i:03d}" for i in range((warmup_rounds + rounds) * args.block)]
    shape = write_loras(args, model_id, work / "loras", ["pinned-a", "pinned-b", *fresh])
    # Pinned brands never leave; the one LRU place turns over with every fresh brand.
    server = Server(
        server_env(args, model_id, work / "loras", LORA_PRELOAD_BRANDS="pinned-a,pinned-b", LORA_CACHE_MAX_SIZE=1),
        work,
    )
    body = {"prompt": "a product photo", "width": args.size, "height": args.size, "num_inference_steps": steps,
            "seed": 1}  # fmt: skip
    # Per kind, per request: the client's time and the service's own timings.
    kinds: dict[str, list[dict]] = {"switch": [], "miss": []}
    pinned = itertools.cycle(("pinned-a", "pinned-b"))
    try:
        with httpx.Client() as client:
            for n in range(warmup_rounds + rounds):
                for kind, next_brand in (("switch", lambda: next(pinned)), ("miss", fresh.pop)):
                    for _ in range(args.block):
                        ms, reply = request(client, server.url, {**body, "brand_id": next_brand()})
                        if n >= warmup_rounds:
                            kinds[kind].append({"client_ms": ms, **reply["timings"]})
            stats = client.get(f"{server.url}/lora/cache/stats").json()
    finally:
        server.stop()

    def p50(kind: str, field: str) -> float:
        return statistics.median(t[field] for t in kinds[kind])

    result = {
        "lora": shape.describe(),
        "file_mib": (work / "loras" / "pinned-a" / "style.safetensors").stat().st_size / 2**20,
        "switch_p50_ms": p50("switch", "client_ms"),
        "miss_p50_ms": p50("miss", "client_ms"),
        # Pairs close in time: the k-th miss and the k-th switch (of the same round).
        "miss_cost_ms": statistics.median(
            m["client_ms"] - s["client_ms"] for m, s in zip(kinds["miss"], kinds["switch"], strict=True)
        ),
        "miss_lora_ms_p50": p50("miss", "lora_ms"),
        "switch_lora_ms_p50": p50("switch", "lora_ms"),
        "miss_generation_ms_p50": p50("miss", "generation_ms"),
        "switch_generation_ms_p50": p50("switch", "generation_ms"),
        "requests_per_kind": len(kinds["miss"]),
        "requests": kinds,
        "cache": stats,
    }
    r = result
    print(f"\nLoRA: {r['lora']}, {r['file_mib']:.1f} MiB per file; {steps} step(s) at {args.size}x{args.size}")
    print("| request | p50 ms | service: LoRA ms p50 | service: generation ms p50 |\n|---|---|---|---|")
    labels = {"switch": "cached switch (pinned brands alternating)", "miss": "cold miss (a new brand each time)"}
    for kind, label in labels.items():
        print(f"| {label} | {r[kind + '_p50_ms']:.1f} | {r[kind + '_lora_ms_p50']:.1f} | "
              f"{r[kind + '_generation_ms_p50']:.1f} |")
    print(f"\nmiss cost beyond a cached switch (median of paired differences): {r['miss_cost_ms']:.1f} ms "
          f"(target: <= 100 ms on CPU, 50 on GPU); reported LoRA ms differ by "
          f"{r['miss_lora_ms_p50'] - r['switch_lora_ms_p50']:.1f} ms")
    return result


def run_zipf(args, model_id: str, work: Path) -> dict:
    """Base requests and Zipf-mix requests in alternating blocks (so the machine's drift hits both
    alike), after one request per brand (each file's first read, as a service that has run a while;
    the host tier keeps them) and `--warmup` mix requests."""
    steps = args.steps or 4
    block = args.block or 10
    brands = [f"zipf-{i:02d}" for i in range(args.brands)]
    write_loras(args, model_id, work / "loras", brands)
    rng = random.Random(3)
    weights = [1 / (k + 1) ** args.zipf_s for k in range(len(brands))]
    mix = iter(rng.choices(brands, weights=weights, k=args.requests + args.warmup))
    server = Server(server_env(args, model_id, work / "loras", LORA_CACHE_MAX_SIZE=args.cache), work)
    body = {"prompt": "a product photo", "width": args.size, "height": args.size, "num_inference_steps": steps}
    latencies: dict[str, list[float]] = {"base": [], "mix": []}
    seconds = {"base": 0.0, "mix": 0.0}
    lock = threading.Lock()
    try:

        def one(kind: str, i: int, brand: str | None):
            with httpx.Client() as client:
                ms, _ = request(client, server.url, {**body, "seed": i, "brand_id": brand})
            with lock:
                latencies[kind].append(ms)

        def run(kind: str, items) -> None:
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(lambda item: one(kind, *item), items))
            seconds[kind] += time.perf_counter() - start

        run("base", [(0, None)])  # the first request and the warm-up mix are not timed
        run("mix", [(i, brand) for i, brand in enumerate(brands)])
        run("mix", [(i, next(mix)) for i in range(args.warmup)])
        latencies["base"].clear(), latencies["mix"].clear()
        seconds.update(base=0.0, mix=0.0)
        done = 0
        while done < args.requests:
            n = min(block, args.requests - done)
            run("base", [(done + i, None) for i in range(n)])
            run("mix", [(done + i, next(mix)) for i in range(n)])
            done += n
        with httpx.Client() as client:
            stats = client.get(f"{server.url}/lora/cache/stats").json()
    finally:
        server.stop()
    result = {
        "clients": args.clients,
        "requests": args.requests,
        "warmup_requests": args.warmup,
        "block": block,
        "host_cache_mb": args.host_cache_mb,
        "base_images_per_s": args.requests / seconds["base"],
        "zipf_images_per_s": args.requests / seconds["mix"],
        "zipf_vs_base": seconds["base"] / seconds["mix"],
        "base_p50_ms": percentile(latencies["base"], 0.5),
        "zipf_p50_ms": percentile(latencies["mix"], 0.5),
        "zipf_p95_ms": percentile(latencies["mix"], 0.95),
        "cache": stats,
    }
    print(f"\n{args.requests} requests per row from {args.clients} client(s) in blocks of {block} after "
          f"one per brand and {args.warmup} warm-up; {len(brands)} brands (Zipf s={args.zipf_s}), cache "
          f"{args.cache}, host tier {args.host_cache_mb} MB; {steps} steps at {args.size}px")  # fmt: skip
    print("| row | images/s | p50 ms |\n|---|---|---|")
    print(f"| base (no LoRA) | {result['base_images_per_s']:.2f} | {result['base_p50_ms']:.1f} |")
    print(f"| Zipf mix | {result['zipf_images_per_s']:.2f} | {result['zipf_p50_ms']:.1f} |")
    print(f"\nZipf throughput / base: {result['zipf_vs_base']:.3f} (target >= 0.97 on CPU); device hit rate "
          f"{stats['hit_rate']:.2f}")  # fmt: skip
    return result


def run_batch(args, model_id: str, work: Path) -> dict:
    steps = args.steps or 4
    brands = [f"brand-{i}" for i in range(args.clients)]
    write_loras(args, model_id, work / "loras", brands)
    body = {"prompt": "a product photo", "width": args.size, "height": args.size, "num_inference_steps": steps}
    mixes = {"one brand": [brands[0]] * args.requests, f"{len(brands)} brands": [brands[i % len(brands)]
             for i in range(args.requests)]}  # fmt: skip
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        env = server_env(args, model_id, work / "loras", LORA_CACHE_MAX_SIZE=len(brands), BATCH_MAX_SIZE=batch)
        server = Server(env, work)
        try:
            with httpx.Client() as client:
                for brand in brands:  # every adapter resident: the rows measure batching, not loading
                    request(client, server.url, {**body, "seed": 0, "brand_id": brand})
            for mix_name, mix in mixes.items():
                sizes: list[int] = []

                def one(i_brand, url=server.url, sizes=sizes):
                    i, brand = i_brand
                    with httpx.Client() as client:
                        _, reply = request(client, url, {**body, "seed": i, "brand_id": brand})
                    sizes.append(reply["batch_size"])

                start = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(one, enumerate(mix)))
                elapsed = time.perf_counter() - start
                rows.append({"batch_max_size": batch, "mix": mix_name, "images_per_s": len(mix) / elapsed,
                             "mean_batch": statistics.fmean(sizes)})  # fmt: skip
        finally:
            server.stop()
    unbatched = {r["mix"]: r["images_per_s"] for r in rows if r["batch_max_size"] == 1}
    one = next(r["images_per_s"] for r in rows if r["batch_max_size"] == max(int(b) for b in args.batches.split(","))
               and r["mix"] == "one brand")  # fmt: skip
    print(f"\n{args.requests} requests per row from {args.clients} clients; {steps} steps at {args.size}px")
    print("| BATCH_MAX_SIZE | mix | images/s | x unbatched | mean batch |\n|---|---|---|---|---|")
    for r in rows:
        ratio = r["images_per_s"] / unbatched[r["mix"]] if r["mix"] in unbatched else float("nan")
        r["vs_unbatched"] = ratio
        print(f"| {r['batch_max_size']} | {r['mix']} | {r['images_per_s']:.2f} | {ratio:.2f} | {r['mean_batch']:.2f} |")
    mixed_best = max(r["images_per_s"] for r in rows if r["mix"] != "one brand")
    print(f"\nmixed brands (best batched) / one brand (largest batch): {mixed_best / one:.2f}")
    return {"rows": rows, "clients": args.clients, "requests_per_row": args.requests}


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = args.preset or ("sd15-random" if args.mode == "miss" else "tiny")
    if args.host_cache_mb is None:  # a miss is a cold read; the other modes run the service as configured
        from app.config import Settings

        args.host_cache_mb = 0 if args.mode == "miss" else Settings.model_fields["lora_host_cache_mb"].default
    model_id = model_id_for(preset, args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        work = Path(tmp)
        run = {"miss": run_miss, "zipf": run_zipf, "batch": run_batch}[args.mode]
        result = run(args, model_id, work)
    name = args.name or f"http-{args.mode}-{preset}-{args.device}"
    payload = {
        "name": name,
        "command": "python -m bench.http " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "model": preset,
        "result": result,
    }
    print(f"\nwrote {write_json(RESULTS_DIR / f'{name}.json', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
