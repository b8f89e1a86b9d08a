"""`python -m bench`: LoRA serving benchmark on the real engine and LoRA manager, in-process.

    python -m bench                      # CPU default: tiny model, 64x64, 4 steps (a few minutes)
    python -m bench --quick              # fewer requests per row
    python -m bench --soak               # memory soak: 1,000 requests over 20 adapters, cache 5
    python -m bench --preset sd15-random --device cuda   # GPU: 512x512, 20 steps, fp16 (bench/gpu.sh)

Prints a table and writes JSON to bench/results/<name>.json. It measures; it does not assert.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.loras import LoraShape
from bench.models import PRESETS, model_id_for

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="tiny", help="tiny (CPU default) or sd15-random")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    p.add_argument("--size", type=int, help="width = height (default 64 tiny, 512 sd15-random)")
    p.add_argument("--steps", type=int, help="denoising steps (default 4 tiny, 20 sd15-random)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--requests", type=int, default=30, help="timed requests per row")
    p.add_argument("--quick", action="store_true", help="10 timed requests per row")
    p.add_argument("--block", type=int, default=5, help="requests per row per interleaving round")
    p.add_argument(
        "--concurrency", type=int, default=1, help="client threads per block (the naive row stays sequential)"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, = cores)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--format", dest="key_format", choices=("peft", "kohya"), default="peft")
    p.add_argument("--targets", choices=("attn", "attn-ff"), default="attn-ff")
    p.add_argument("--no-text-encoder", action="store_true", help="LoRAs without text-encoder layers")
    p.add_argument("--round-robin", type=int, default=5, help="N brands for the round-robin row")
    p.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of the 20-brand mix")
    p.add_argument("--no-naive", action="store_true", help="skip the naive diffusers row")
    p.add_argument("--ops-ranks", default="8,64,128", help="ranks for the cold-load measurements")
    p.add_argument("--resident", default="1,50", help="resident adapter counts for the switch measurements")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (COMPILE_UNET)")
    p.add_argument("--compile-mode", default="default", help="COMPILE_MODE, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--soak", action="store_true", help="run the memory soak instead of the table")
    p.add_argument("--soak-requests", type=int, default=1000)
    p.add_argument("--soak-warmup", type=int, default=100)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where models are built and kept")
    p.add_argument("--lora-dir", type=Path, help="where benchmark LoRA files go (default: a temp folder)")
    p.add_argument("--name", help="results file name (default: <preset>-<device>[-soak])")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/<name>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    from app.config import Settings
    from app.engine.diffusion import DiffusionEngine
    from app.jobs import GenerationSpec
    from bench import report, workloads

    if args.threads:
        torch.set_num_threads(args.threads)
    gpu_preset = args.preset == "sd15-random"
    size = args.size or (512 if gpu_preset else 64)
    steps = args.steps or (20 if gpu_preset else 4)
    requests = 10 if args.quick else args.requests
    shape = LoraShape(args.rank, args.key_format, args.targets == "attn-ff", not args.no_text_encoder)

    t0 = time.perf_counter()
    settings = Settings(
        model_id=model_id_for(args.preset, args.cache_dir),
        device=args.device,
        dtype=args.dtype,
        model_cache_dir=args.cache_dir,
        compile_unet=args.compile,
        compile_mode=args.compile_mode,
        compile_warmup_size=size,
    )
    engine = DiffusionEngine(settings)
    gc.freeze()  # as the service does once its model is loaded (app/state.py)
    name = (
        args.name or f"{args.preset}-{engine.device}{'-compile' if args.compile else ''}{'-soak' if args.soak else ''}"
    )
    spec = GenerationSpec(PROMPT_TEXT, None, size, size, steps, args.guidance, 42)
    lora_root = args.lora_dir or Path(tempfile.mkdtemp(prefix="bench-loras-"))
    lora_root = lora_root / f"{args.preset}-r{shape.rank}-{shape.key_format}-{args.targets}-te{int(shape.text_encoder)}"
    setup_s = time.perf_counter() - t0
    payload = {
        "name": name,
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": report.machine(),
        "model": args.preset,
        "model_id": settings.model_id,
        "device": engine.device,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "workload": {
            "width": size,
            "height": size,
            "steps": steps,
            "guidance": args.guidance,
            "lora": shape.describe(),
            "compile_unet": args.compile,
            "concurrency": args.concurrency,
        },  # fmt: skip
        "setup_seconds": setup_s,
    }
    print(f"model {args.preset} on {engine.device} ({payload['dtype']}), {size}x{size}, {steps} steps, "
          f"guidance {args.guidance}, LoRAs: {shape.describe()}, {args.concurrency} client(s); "
          f"setup {setup_s:.1f} s", flush=True)  # fmt: skip

    if args.soak:
        result = workloads.soak(engine, lora_root, shape, spec, args.soak_requests, args.soak_warmup)
        payload["soak"] = result
        mib = {k: v / 2**20 for k, v in result["rss_bytes"].items()}
        print(
            f"soak: {result['requests']} requests in {result['seconds']:.0f} s; RSS start {mib['start']:.1f} MiB, "
            f"after warm-up {mib['after warm-up']:.1f} MiB, end {mib['end']:.1f} MiB; growth after warm-up "
            f"{result['rss_growth_after_warmup_pct']:+.2f}% ({'flat' if result['flat'] else 'NOT flat'}, <= 5%)"
        )
        if result["gpu_allocated_bytes"]:
            print(
                "GPU allocated MiB: "
                + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in result["gpu_allocated_bytes"].items())
            )
    else:
        graphs_after_warm_up = (engine.compile_stats() or {}).get("graphs")
        rows, registry = workloads.build_rows(engine, lora_root, shape, args, naive=not args.no_naive)
        naive = None if args.no_naive else workloads.NaiveDiffusers(engine, registry)
        t1 = time.perf_counter()
        workloads.run_rows(engine, rows, spec, requests, args.block, naive, args.concurrency)
        summary = report.summarize(rows)
        payload["rows"] = summary
        payload["rows_seconds"] = time.perf_counter() - t1
        ranks = [int(r) for r in args.ops_ranks.split(",") if r]
        resident = [int(r) for r in args.resident.split(",") if r]
        payload["lora_operations"] = workloads.lora_operations(engine, lora_root, shape, ranks, resident)
        payload["targets"] = report.targets(summary)
        if engine.compile_stats() is not None:
            # Every row after the start-up warm-up switches LoRA sets: a recompilation would add a graph.
            payload["compile"] = {**engine.compile_stats(), "graphs_after_warm_up": graphs_after_warm_up}
            payload["targets"].append(
                f"compile: {payload['compile']['compile_seconds']:.1f} s at start-up; recompilations during the "
                f"rows and LoRA operations: {payload['compile']['graphs'] - graphs_after_warm_up} (target 0)"
            )
        print(report.table(summary))
        print()
        print(report.ops_table(payload["lora_operations"]))
        print()
        print("\n".join(payload["targets"]))
    payload["total_seconds"] = time.perf_counter() - t0
    path = report.write_json(args.out or RESULTS_DIR / f"{name}.json", payload)
    print(f"total {payload['total_seconds']:.0f} s; JSON: {path}")
    return 0


PROMPT_TEXT = "a product photo of a red cup on a table"

if __name__ == "__main__":
    sys.exit(main())
