"""`python -m bench.routing_sim`: plan past one machine. Hit rate and throughput of LoRA routing policies.

    python -m bench.routing_sim                                   # 200 brands, Zipf 1.0, cache 5, R = 1..16
    python -m bench.routing_sim --brands 1000 --cache 20 --replicas 1,2,4,8,16,32 --zipf-s 0.8
    python -m bench.routing_sim --gen-ms 1900 --load-ms 150 --switch-ms 25   # your GPU's numbers
    python -m bench.routing_sim --stream round-robin --brands 4 --cache 2 --replicas 2 --requests 400
                                                                  # a working set that fits: 0 misses after round 1

N brands with Zipf popularity (or `--stream round-robin`: the N brands in turn), R replicas with a
LoRA cache of C adapters each, a saturated stream of requests. Each replica works through its
requests one at a time; a request costs `gen_ms`, plus `load_ms` on a cache miss (reading the
file), plus `switch_ms` when its LoRA set differs from the replica's previous one (merging the set
into the weights). Defaults: the CPU numbers of BENCHMARKS.md (tiny model, 64x64, 4 steps: base
p50 285.8 ms, cold load rank 8 13.87 ms, switch with a few resident 3.72 ms). Policies:

- affinity: this service's Ray routing (app/serve/routing.py `AffinityPlanner` + the router): a set
  goes to the replica that holds it; a new set to the slot with the least recent traffic; a set that
  one replica cannot carry (share above (1 + `--hot-margin`) / R) gets copies on more replicas. When
  the chosen replica is busy (more than `--spill` requests behind the least busy one) the request
  spills to the least busy one.
- random: any replica (Ray's default without multiplexing; a plain load balancer).
- one-big-cache: one cache of R x C shared by R workers (the upper bound: what a shared cache or a
  perfectly partitioned one gives; throughput assumes perfect load balance).

Prints a table per R and writes JSON and a PNG plot (hit rate vs R) under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from app.serve.routing import AffinityPlanner

RESULTS_DIR = Path(__file__).resolve().parent / "results"
POLICIES = ("affinity", "random", "one-big-cache")


@dataclass
class Row:
    policy: str
    replicas: int
    hit_rate: float
    switch_rate: float
    throughput: float  # images per second, all replicas
    imbalance: float  # busiest replica's work / mean
    held_hot: int  # replicas holding the most popular brand at the end
    misses_after_first_round: int  # misses after the first `--brands` requests (a working set that fits: 0)


class Replica:
    def __init__(self, cache: int):
        self.cache: OrderedDict[str, bool] = OrderedDict()
        self.size = cache
        self.busy_ms = 0.0
        self.last: str | None = None

    def serve(self, key: str, args) -> tuple[bool, bool]:
        hit = key in self.cache
        if hit:
            self.cache.move_to_end(key)
        else:
            self.cache[key] = True
            if len(self.cache) > self.size:
                self.cache.popitem(last=False)
        switched = key != self.last
        self.last = key
        self.busy_ms += args.gen_ms + (0 if hit else args.load_ms) + (args.switch_ms if switched else 0)
        return hit, switched


def request_stream(args, rng: random.Random) -> list[str]:
    if args.stream == "round-robin":
        return [f"brand-{i % args.brands}" for i in range(args.requests)]
    weights = [1 / (i + 1) ** args.zipf_s for i in range(args.brands)]
    return rng.choices([f"brand-{i}" for i in range(args.brands)], weights=weights, k=args.requests)


def simulate(policy: str, replicas: int, stream: list[str], args) -> Row:
    rng = random.Random(args.seed + 1)
    if policy == "one-big-cache":
        pool = [Replica(args.cache * replicas)]
    else:
        pool = [Replica(args.cache) for _ in range(replicas)]
    planner = AffinityPlanner(replicas, args.window, args.hot_margin)
    hits = switches = late_misses = 0
    for i, key in enumerate(stream):
        if policy == "one-big-cache":
            chosen = pool[0]
        elif policy == "random":
            chosen = rng.choice(pool)
        else:
            routing_key, slot = planner.route(key)
            holders = [r for r in pool if routing_key in r.cache]
            chosen = holders[0] if holders else pool[slot]
            least = min(pool, key=lambda r: r.busy_ms)
            if chosen.busy_ms - least.busy_ms > args.spill * args.gen_ms:
                chosen = least  # Ray's router: a replica at max_ongoing_requests is skipped
            key = routing_key
        hit, switched = chosen.serve(key, args)
        hits += hit
        switches += switched
        late_misses += not hit and i >= args.brands
    if policy == "one-big-cache":
        total = pool[0].busy_ms / replicas  # perfect balance over R workers
        imbalance = 1.0
        held_hot = min(replicas, 1)
    else:
        total = max(r.busy_ms for r in pool)
        mean = sum(r.busy_ms for r in pool) / len(pool)
        imbalance = total / mean if mean else 1.0
        held_hot = sum(1 for r in pool if any(k.split("#")[0] == "brand-0" for k in r.cache))
    n = len(stream)
    throughput = n / (total / 1000) if total else 0.0
    return Row(policy, replicas, hits / n, switches / n, throughput, imbalance, held_hot, late_misses)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.routing_sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--brands", type=int, default=200, help="N brands (one LoRA each)")
    p.add_argument("--stream", choices=("zipf", "round-robin"), default="zipf", help="brand popularity")
    p.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of brand popularity")
    p.add_argument("--replicas", default="1,2,4,8,16", help="R values, comma-separated")
    p.add_argument("--cache", type=int, default=5, help="C: adapters per replica (LORA_CACHE_MAX_SIZE)")
    p.add_argument("--requests", type=int, default=50_000)
    p.add_argument("--gen-ms", type=float, default=285.8, help="one generation (BENCHMARKS.md CPU base p50)")
    p.add_argument("--load-ms", type=float, default=13.87, help="cold LoRA load (BENCHMARKS.md, rank 8)")
    p.add_argument("--switch-ms", type=float, default=3.72, help="merging another set (BENCHMARKS.md zipf row)")
    p.add_argument("--hot-margin", type=float, default=0.25, help="RAY_HOT_MARGIN")
    p.add_argument("--window", type=int, default=200, help="RAY_HOT_WINDOW")
    p.add_argument("--spill", type=float, default=4.0, help="generations of backlog before a request spills")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="routing-sim", help="bench/results/<name>.json and .png")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stream = request_stream(args, random.Random(args.seed))
    rows = [simulate(policy, r, stream, args) for r in map(int, args.replicas.split(",")) for policy in POLICIES]
    top_share = stream.count("brand-0") / len(stream)
    popularity = "round robin" if args.stream == "round-robin" else f"Zipf {args.zipf_s}"
    print(f"{args.brands} brands, {popularity} (top brand {top_share:.1%} of traffic), cache {args.cache} "
          f"per replica, {args.requests} requests; gen {args.gen_ms} ms, load {args.load_ms} ms, "
          f"switch {args.switch_ms} ms")  # fmt: skip
    print("| R | policy | hit rate | switches/req | img/s | img/s per replica | imbalance | replicas holding top "
          "| misses after round 1 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.replicas} | {row.policy} | {row.hit_rate:.3f} | {row.switch_rate:.3f} | {row.throughput:.2f} | "
              f"{row.throughput / row.replicas:.3f} | {row.imbalance:.2f} | {row.held_hot} "
              f"| {row.misses_after_first_round} |")  # fmt: skip
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{args.name}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"wrote {out}")
    if not args.no_plot:
        print(f"wrote {plot(rows, RESULTS_DIR / f'{args.name}.png', args)}")
    return 0


def plot(rows: list[Row], path: Path, args) -> Path:
    """Hit rate vs R per policy: matplotlib when installed (`pip install .[bench]`), else PIL."""
    series = {p: [(r.replicas, r.hit_rate) for r in rows if r.policy == p] for p in POLICIES}
    title = f"LoRA cache hit rate vs replicas ({args.brands} brands, Zipf {args.zipf_s}, cache {args.cache}/replica)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for policy, points in series.items():
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=policy)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("replicas (R)")
        ax.set_ylabel("hit rate")
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
    except ImportError:
        _plot_pil(series, path, title)
    return path


def _plot_pil(series: dict, path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    w, h, m = 720, 440, 60
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    draw.text((m, 15), title, fill="black")
    draw.rectangle((m, m, w - m, h - m), outline="black")
    xs = sorted({x for points in series.values() for x, _ in points})
    px = lambda x: m + (w - 2 * m) * (xs.index(x) / max(1, len(xs) - 1))  # noqa: E731
    py = lambda y: h - m - (h - 2 * m) * y  # noqa: E731
    for x in xs:
        draw.text((px(x) - 4, h - m + 8), str(x), fill="black")
    for y in (0, 0.25, 0.5, 0.75, 1.0):
        draw.text((m - 34, py(y) - 6), f"{y:.2f}", fill="black")
    for i, (policy, points) in enumerate(series.items()):
        colour = ("tab:blue", "red", "green")[i % 3].replace("tab:", "")
        draw.line([(px(x), py(y)) for x, y in points], fill=colour, width=2)
        draw.text((w - m - 120, m + 10 + 14 * i), policy, fill=colour)
    image.save(path)


if __name__ == "__main__":
    raise SystemExit(main())
