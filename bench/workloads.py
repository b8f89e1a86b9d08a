"""The benchmark's workloads, driven through the real LoraManager and DiffusionEngine in-process.

Rows are measured interleaved: in each round every row runs a short block of requests, so that a
noisy neighbour on a shared machine slows all rows alike and the ratios to base-only stay honest.
Each block starts with one untimed request repeating the row's previous one, which puts back the
row's merged adapters (another row ran in between) without changing its cache.
"""

from __future__ import annotations

import random
import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.engine.diffusion import DiffusionEngine
from app.jobs import ActiveAdapter, GenerationJob, GenerationSpec, LoraSpec
from app.lora.file_facts import LoraFileFacts
from app.lora.manager import LoraManager
from app.lora.registry import LoraRegistry
from bench.loras import LoraShape, write_brands

PROMPT = "a product photo of a red cup on a table"
LORA_WEIGHT = 0.8


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def sync(engine: DiffusionEngine) -> None:
    if engine.device == "cuda":
        torch.cuda.synchronize()


def gpu_peak_bytes(engine: DiffusionEngine) -> int | None:
    return torch.cuda.max_memory_allocated() if engine.device == "cuda" else None


@dataclass
class Sample:
    latency_ms: float
    load_ms: float  # cold loads this request caused (cache misses)
    switch_ms: float  # merging the request's adapter set into the weights
    hits: int
    misses: int


@dataclass
class Row:
    """One workload: a sequence of requests, each a list of LoRAs (empty = base model)."""

    name: str
    description: str
    next_loras: Callable[[int], list[LoraSpec]]
    manager: LoraManager | None = None  # None: the naive diffusers row
    warmup: int = 2
    samples: list[Sample] = field(default_factory=list)
    peak_rss: int = 0
    peak_gpu: int | None = None
    position: int = 0
    last: list[LoraSpec] | None = None
    wall_s: float = 0.0  # wall time of the timed blocks: throughput = requests / wall_s
    block_rps: list[float] = field(default_factory=list)  # each round's block: requests / its wall time

    def take(self) -> list[LoraSpec]:
        loras = self.next_loras(self.position)
        self.position += 1
        self.last = loras
        return loras


HOST_CACHE_BYTES = 2048 * 2**20  # the service's default LORA_HOST_CACHE_MB


def new_manager(registry: LoraRegistry, engine: DiffusionEngine, cache_size: int) -> LoraManager:
    """The service's LoRA manager over a benchmark folder (files up to 1 GiB, cache on, default host tier)."""
    facts = LoraFileFacts(max_file_bytes=2**30)
    return LoraManager(registry, facts, engine, True, cache_size, HOST_CACHE_BYTES)


def engine_request(engine: DiffusionEngine, manager: LoraManager, spec: GenerationSpec, loras) -> Sample:
    before = manager.cache.stats()
    start = time.perf_counter()
    acquired = manager.acquire(loras)
    result = engine.generate(GenerationJob(spec, tuple(acquired.adapters)))
    sync(engine)
    latency = (time.perf_counter() - start) * 1000
    after = manager.cache.stats()
    return Sample(latency, acquired.load_ms, result.lora_ms, after.hits - before.hits, after.misses - before.misses)


class NaiveDiffusers:
    """The per-request approach done with diffusers alone: load_lora_weights, set_adapters, generate, unload."""

    def __init__(self, engine: DiffusionEngine, registry: LoraRegistry):
        from diffusers import StableDiffusionPipeline

        self.registry = registry
        self.pipe = StableDiffusionPipeline.from_pretrained(
            engine.model_path, dtype=engine.dtype, safety_checker=None, requires_safety_checker=False
        ).to(engine.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.engine = engine

    def request(self, spec: GenerationSpec, loras: list[LoraSpec]) -> Sample:
        start = time.perf_counter()
        names = []
        for i, lora in enumerate(loras):
            path = self.registry.resolve(lora.brand_id).path
            name = f"a{i}"
            self.pipe.load_lora_weights(str(path), adapter_name=name)
            names.append(name)
        loaded = time.perf_counter()
        if names:
            self.pipe.set_adapters(names, [lora.weight for lora in loras])
        with torch.inference_mode():
            self.pipe(
                prompt=spec.prompt,
                width=spec.width,
                height=spec.height,
                num_inference_steps=spec.num_inference_steps,
                guidance_scale=spec.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(spec.seed),
            )
        if names:
            self.pipe.unload_lora_weights()
        sync(self.engine)
        end = time.perf_counter()
        return Sample((end - start) * 1000, (loaded - start) * 1000, 0.0, 0, len(names))


def zipf_sequence(n_brands: int, length: int, s: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** s for rank in range(n_brands)]
    return rng.choices(range(n_brands), weights=weights, k=length)


def build_rows(
    engine: DiffusionEngine, lora_root: Path, shape: LoraShape, args, naive: bool = True
) -> tuple[list[Row], LoraRegistry]:
    names = {
        "one": ["one-b00"],
        "rr": [f"rr-b{i:02d}" for i in range(args.round_robin)],
        "zipf": [f"zipf-b{i:02d}" for i in range(20)],
        "mix": [f"mix-b{i:02d}" for i in range(3)],
    }
    for seed, brands in enumerate(names.values()):
        write_brands(lora_root, engine.pipe, brands, shape, seed=100 * seed)
    registry = LoraRegistry(lora_root)

    def manager(cache_size: int) -> LoraManager:
        return new_manager(registry, engine, cache_size)

    zipf = zipf_sequence(20, 100_000, args.zipf_s, seed=7)
    # The service's steady state: every brand was read from disk once (the host tier keeps them), so
    # the Zipf row's device misses are host-tier re-misses. First reads are the "cold load" rows.
    zipf_row = list(range(20)) + zipf
    mix_weights = (0.6, 0.3, 0.3)
    rows = [
        Row("base", "base model, no LoRA", lambda i: [], manager(5)),
        Row("one-brand", "one brand repeated (cached)", lambda i: [LoraSpec(names["one"][0], LORA_WEIGHT)], manager(5)),
        Row(
            f"round-robin-{args.round_robin}",
            f"{args.round_robin} brands round robin, cache {args.round_robin}",
            lambda i: [LoraSpec(names["rr"][i % args.round_robin], LORA_WEIGHT)],
            manager(args.round_robin),
            warmup=args.round_robin,
        ),
        Row(
            "zipf-20-cache-5",
            f"Zipf(s={args.zipf_s}) over 20 brands, cache 5",
            lambda i: [LoraSpec(names["zipf"][zipf_row[i]], LORA_WEIGHT)],
            manager(5),
            warmup=40,
        ),
        Row(
            "three-composed",
            "three LoRAs per request (0.6/0.3/0.3), cached",
            lambda i: [LoraSpec(b, w) for b, w in zip(names["mix"], mix_weights, strict=True)],
            manager(5),
        ),
    ]
    if naive:
        rows.append(
            Row(
                "naive-diffusers-zipf",
                "diffusers load_lora_weights/set_adapters/unload per request, Zipf brands",
                lambda i: [LoraSpec(names["zipf"][zipf[i]], LORA_WEIGHT)],
                None,
                warmup=1,
            )
        )
    return rows, registry


def run_rows(
    engine: DiffusionEngine,
    rows: list[Row],
    spec: GenerationSpec,
    requests: int,
    block: int,
    naive_impl,
    concurrency: int = 1,
):
    """Run every row in interleaved blocks. With `concurrency` > 1, that many client threads send the
    block's requests at once, as clients of the service do: LoRA files load in the request threads
    while the engine's one generation runs (the engine lock serialises generation). The naive row
    stays sequential: one diffusers pipeline cannot load adapters while it generates."""

    def one(row: Row, loras) -> Sample:
        if row.manager is None:
            return naive_impl.request(spec, loras)
        return engine_request(engine, row.manager, spec, loras)

    for row in rows:
        for _ in range(row.warmup):
            one(row, row.take())
    done = 0
    while done < requests:
        n = min(block, requests - done)
        for row in rows:
            if row.manager is not None and row.last is not None:
                one(row, row.last)  # untimed: put this row's adapters back in place
            if engine.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            if concurrency > 1 and row.manager is not None:
                batch = [row.take() for _ in range(n)]
                with ThreadPoolExecutor(concurrency) as pool:
                    row.samples += pool.map(lambda loras, row=row: one(row, loras), batch)
            else:
                for _ in range(n):
                    row.samples.append(one(row, row.take()))
            elapsed = time.perf_counter() - start
            row.wall_s += elapsed
            row.block_rps.append(n / elapsed)
            row.peak_rss = max(row.peak_rss, rss_bytes())
            gpu = gpu_peak_bytes(engine)
            if gpu is not None:
                row.peak_gpu = max(row.peak_gpu or 0, gpu)
        done += n


def lora_operations(engine: DiffusionEngine, lora_root: Path, shape: LoraShape, ranks, resident_counts, repeats=3):
    """Cold load per rank, and switch time between two cached adapters with N adapters resident."""
    results: dict[str, float] = {}
    for rank in ranks:
        brands = [f"ops-r{rank}-{i}" for i in range(repeats)]
        write_brands(
            lora_root,
            engine.pipe,
            brands,
            LoraShape(rank, shape.key_format, shape.feed_forward, shape.text_encoder, shape.dtype),
            seed=900 + rank,
        )
        times, known_times = [], []
        for brand in brands:
            path = lora_root / brand / "style.safetensors"
            sync(engine)
            start = time.perf_counter()
            first = engine.load_adapter(path)
            sync(engine)
            times.append((time.perf_counter() - start) * 1000)
            # As the service reads a file hashed before (its start-up pass, or an earlier read).
            start = time.perf_counter()
            engine.to_device(engine.read_adapter(path, known_sha256=(first.fingerprint, first.sha256)))
            sync(engine)
            known_times.append((time.perf_counter() - start) * 1000)
        results[f"cold load rank {rank} (ms)"] = sorted(times)[len(times) // 2]
        results[f"cold load rank {rank}, hash known (ms)"] = sorted(known_times)[len(known_times) // 2]
    path = lora_root / f"ops-r{ranks[0]}-0" / "style.safetensors"
    for count in resident_counts:
        keys = [f"resident-{i}" for i in range(count)]
        weights = [engine.load_adapter(path) for _ in keys]
        times = []
        for i in range(max(10, 2 * repeats)):
            # Alternate between two adapters (base <-> adapter when only one is resident).
            j = i % min(2, count)
            wanted = [ActiveAdapter(keys[j], weights[j], LORA_WEIGHT)] if (count > 1 or i % 2) else []
            sync(engine)
            start = time.perf_counter()
            # The engine's own merge step (nothing else runs here), bracketed by device syncs so GPU
            # work is counted in full.
            engine.merger.activate(wanted)
            sync(engine)
            times.append((time.perf_counter() - start) * 1000)
        del weights
        engine.restore_base()
        results[f"switch, {count} resident (ms)"] = sorted(times[2:])[len(times[2:]) // 2]
    return results


def soak(engine: DiffusionEngine, lora_root: Path, shape: LoraShape, spec: GenerationSpec, requests: int, warmup: int):
    """`requests` requests switching at random among 20 adapters with cache 5; RSS at start/warm-up/end."""
    brands = write_brands(lora_root, engine.pipe, [f"soak-b{i:02d}" for i in range(20)], shape, seed=500)
    manager = new_manager(LoraRegistry(lora_root), engine, cache_size=5)
    rng = random.Random(11)
    points = {"start": rss_bytes()}
    gpu = {"start": torch.cuda.memory_allocated()} if engine.device == "cuda" else None
    start = time.perf_counter()
    for i in range(requests):
        engine_request(engine, manager, spec, [LoraSpec(rng.choice(brands), LORA_WEIGHT)])
        if i + 1 == warmup:
            points["after warm-up"] = rss_bytes()
            if gpu is not None:
                gpu["after warm-up"] = torch.cuda.memory_allocated()
        if (i + 1) % 100 == 0:
            print(f"  soak {i + 1}/{requests}: RSS {rss_bytes() / 2**20:.1f} MiB", flush=True)
    points["end"] = rss_bytes()
    if gpu is not None:
        gpu["end"] = torch.cuda.memory_allocated()
    growth = (points["end"] - points["after warm-up"]) / points["after warm-up"] * 100
    stats = manager.cache_stats()
    return {
        "requests": requests,
        "warmup_requests": warmup,
        "seconds": time.perf_counter() - start,
        "rss_bytes": points,
        "gpu_allocated_bytes": gpu,
        "rss_growth_after_warmup_pct": growth,
        "flat": growth <= 5.0,
        "cache": {"hits": stats.hits, "misses": stats.misses, "evictions": stats.evictions},
        "resident_after": len(manager.resident_adapters()),
    }
