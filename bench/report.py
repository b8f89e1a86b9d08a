"""Summaries, the printed table and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
from datetime import UTC, datetime
from pathlib import Path

import torch


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(rows) -> list[dict]:
    out = []
    for row in rows:
        lat = [s.latency_ms for s in row.samples]
        hits, misses = sum(s.hits for s in row.samples), sum(s.misses for s in row.samples)
        out.append(
            {
                "name": row.name,
                "description": row.description,
                "requests": len(lat),
                "p50_ms": percentile(lat, 0.5),
                "p95_ms": percentile(lat, 0.95),
                "mean_ms": statistics.fmean(lat),
                "throughput_rps": len(lat) / row.wall_s,
                "cold_load_ms_per_request": statistics.fmean(s.load_ms for s in row.samples),
                "switch_ms_per_request": statistics.fmean(s.switch_ms for s in row.samples),
                "cache_hit_rate": hits / (hits + misses) if hits + misses else None,
                "peak_rss_bytes": row.peak_rss,
                "peak_gpu_bytes": row.peak_gpu,
            }
        )
    base = next(r for r in out if r["name"] == "base")
    base_blocks = next(row.block_rps for row in rows if row.name == "base")
    for r, row in zip(out, rows, strict=True):
        r["p50_vs_base"] = r["p50_ms"] / base["p50_ms"]
        r["throughput_vs_base"] = r["throughput_rps"] / base["throughput_rps"]
        # The same ratio round by round (each round runs every row's block back to back): its spread
        # shows how far one run's ratio can be moved by the machine's noise.
        rounds = [rps / b for rps, b in zip(row.block_rps, base_blocks, strict=True)]
        r["throughput_vs_base_by_round"] = {
            "rounds": len(rounds),
            "q1": percentile(rounds, 0.25),
            "median": percentile(rounds, 0.5),
            "q3": percentile(rounds, 0.75),
        }
    return out


def table(summary: list[dict]) -> str:
    gpu = any(r["peak_gpu_bytes"] for r in summary)
    head = ["row", "p50 ms", "p95 ms", "req/s", "p50 x base", "thr x base", "load ms/req", "switch ms/req",
            "hit rate", "peak RSS MiB"] + (["peak GPU MiB"] if gpu else [])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [
            r["name"],
            f"{r['p50_ms']:.1f}",
            f"{r['p95_ms']:.1f}",
            f"{r['throughput_rps']:.2f}",
            f"{r['p50_vs_base']:.3f}",
            f"{r['throughput_vs_base']:.3f}",
            f"{r['cold_load_ms_per_request']:.1f}",
            f"{r['switch_ms_per_request']:.2f}",
            "-" if r["cache_hit_rate"] is None else f"{r['cache_hit_rate']:.2f}",
            f"{r['peak_rss_bytes'] / 2**20:.0f}",
        ]
        if gpu:
            cells.append(f"{(r['peak_gpu_bytes'] or 0) / 2**20:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ops_table(ops: dict[str, float]) -> str:
    lines = ["| LoRA operation | ms |", "|---|---|"]
    lines += [f"| {k.removesuffix(' (ms)')} | {v:.2f} |" for k, v in ops.items()]
    return "\n".join(lines)


def targets(summary: list[dict]) -> list[str]:
    by = {r["name"]: r for r in summary}
    checks = []

    def check(label, value, limit, higher_is_better=False):
        ok = value >= limit if higher_is_better else value <= limit
        checks.append(
            f"{'met' if ok else 'NOT met'}: {label} = {value:.3f} ({'>=' if higher_is_better else '<='} {limit})"
        )

    # The limits of issue #12 ("GPU speed"), which apply on every device.
    check("cached LoRA p50 / base p50", by["one-brand"]["p50_vs_base"], 1.02)
    check("three composed p50 / base p50", by["three-composed"]["p50_vs_base"], 1.02)
    check("Zipf throughput / base throughput", by["zipf-20-cache-5"]["throughput_vs_base"], 0.97, True)
    rounds = by["zipf-20-cache-5"]["throughput_vs_base_by_round"]
    checks[-1] += (
        f"; round by round over {rounds['rounds']} rounds: median {rounds['median']:.3f}, "
        f"quartiles {rounds['q1']:.3f}-{rounds['q3']:.3f}"
    )
    if "naive-diffusers-zipf" in by:
        ratio = by["zipf-20-cache-5"]["throughput_rps"] / by["naive-diffusers-zipf"]["throughput_rps"]
        check("Zipf throughput / naive throughput", ratio, 1.8, True)
    return checks


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
