"""`python -m bench.step_events`: what a job's progress event costs a denoising step, in-process.

    python -m bench.step_events                                   # CPU: tiny model, 256x256, 20 steps
    python -m bench.step_events --preset sd15-random --device cuda --size 512

Interleaves, round by round, the same generation (same seed) four ways: no listener (what /generate
does), a listener that hands each step to an event loop as the job runner does, the same with a
latent preview (PNG) every 5 steps (PREVIEW_EVERY's default), and with a preview at every step (the
worst case). Prints the median time per step of each and its ratio to the bare run, and writes JSON
to bench/results/step_events-<preset>-<device>.json. It measures; it does not assert.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from pathlib import Path

from bench.models import PRESETS, model_id_for

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.step_events", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)

    from app.config import Settings
    from app.engine.diffusion import DiffusionEngine
    from app.jobqueue.runner import _preview_png
    from app.jobs import GenerationJob, GenerationSpec, StepControl

    engine = DiffusionEngine(
        Settings(model_id=model_id_for(args.preset, args.cache_dir), device=args.device, model_cache_dir=args.cache_dir)
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    received: list = []

    def listener(step, steps, preview):  # as JobRunner's: encode the preview here, publish on the event loop
        loop.call_soon_threadsafe(received.append, (step, steps, _preview_png(preview)))

    variants = {
        "no listener (/generate)": None,
        "progress events": 0,
        "progress + preview every 5": 5,
        "progress + preview every step": 1,
    }
    # euler: the loop runs exactly `steps` steps (PNDM runs one more)
    spec = GenerationSpec("a red coffee cup", None, args.size, args.size, args.steps, 7.5, 7, scheduler="euler")
    engine.generate(GenerationJob(spec))  # warm-up
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, every in variants.items():
            control = None if every is None else StepControl(listener, preview_every=every)
            start = time.perf_counter()
            engine.generate(GenerationJob(spec, control=control))
            elapsed = time.perf_counter() - start
            per_step[name].append(elapsed * 1000 / args.steps)
    base = statistics.median(per_step["no listener (/generate)"])
    rows = []
    print(f"{args.preset} on {engine.device}, {args.size}x{args.size}, {args.steps} steps, {args.rounds} rounds")
    print(f"{'variant':34} {'ms/step (median)':>17} {'ratio':>7}")
    for name, samples in per_step.items():
        median = statistics.median(samples)
        rows.append({"variant": name, "ms_per_step_median": round(median, 3), "ratio": round(median / base, 4)})
        print(f"{name:34} {median:17.3f} {median / base:7.4f}")
    # The callback's own cost, timed directly (the step ratio above is at the mercy of a noisy machine):
    # one image's report per step, with and without a preview, on latents of this size.
    import torch

    from app.engine.preview import latent_preview

    latents = torch.randn(4, args.size // 8, args.size // 8, device=engine.device)
    callback_us = {}
    for name, with_preview in (("progress event", False), ("progress event + preview", True)):
        control = StepControl(listener, preview_every=1 if with_preview else 0)
        reps = 200
        start = time.perf_counter()
        for i in range(reps):
            control.report(i + 1, reps, latent_preview(latents) if with_preview else None)
        callback_us[name] = (time.perf_counter() - start) * 1e6 / reps
    print(f"{'in the step callback':34} {'us/step':>17} {'of a step':>9}")
    for name, us in callback_us.items():
        print(f"{name:34} {us:17.1f} {us / 1000 / base:9.5f}")
        rows.append({"variant": f"callback: {name}", "us_per_step": round(us, 1), "share_of_step": us / 1000 / base})
    loop.call_soon_threadsafe(loop.stop)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"step_events-{args.preset}-{engine.device}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
