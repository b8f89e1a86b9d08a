"""Turns an A/B request into its variants: an explicit list, or the cartesian product of a weight grid.

Plain Python (no torch): what a test will generate is decided, and refused when too large, before any
file is read or any job is queued.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from app.errors import InvalidRequest, check_unique
from app.jobs import LoraSpec


@dataclass(frozen=True)
class GridAxis:
    """One LoRA of a grid and the weights it is tried at."""

    brand_id: str
    weights: tuple[float, ...]
    version: str | None = None
    type: str | None = None


@dataclass(frozen=True)
class Variant:
    index: int
    loras: tuple[LoraSpec, ...]

    @property
    def label_lines(self) -> list[str]:
        """One line per LoRA, e.g. 'acme 0.2' (with '@v2' when a version was asked for)."""
        if not self.loras:
            return ["base model"]
        return [f"{spec.brand_id}{'@' + spec.version if spec.version else ''} {spec.weight:g}" for spec in self.loras]

    @property
    def label(self) -> str:
        return ", ".join(self.label_lines)


@dataclass(frozen=True)
class AbPlan:
    variants: list[Variant]
    seeds: list[int]
    rows: int  # the contact sheet's layout: a grid for a 2-D sweep, one row otherwise
    cols: int

    def union(self) -> list[LoraSpec]:
        """Every distinct (brand, version) the variants use, in first-use order (weights are irrelevant)."""
        seen: dict[tuple[str, str | None], LoraSpec] = {}
        for variant in self.variants:
            for spec in variant.loras:
                seen.setdefault((spec.brand_id, spec.version), spec)
        return list(seen.values())


def plan_grid(axes: Sequence[GridAxis], seeds: list[int], max_variants: int) -> AbPlan:
    check_unique([LoraSpec(a.brand_id, version=a.version) for a in axes], "grid")
    for axis in axes:
        repeated = sorted({w for w in axis.weights if axis.weights.count(w) > 1})
        if repeated:
            raise InvalidRequest("grid", f"weight {repeated[0]:g} is listed twice for {axis.brand_id!r}")
    sizes = [len(a.weights) for a in axes]
    count = math.prod(sizes)
    if count > max_variants:
        raise InvalidRequest(
            "grid",
            f"the grid makes {count} variants ({' x '.join(map(str, sizes))}); "
            f"at most {max_variants} per test (AB_MAX_VARIANTS)",
        )
    _check_images(count, seeds, max_variants)
    variants = [
        Variant(i, tuple(LoraSpec(a.brand_id, w, a.version, a.type) for a, w in zip(axes, combo, strict=True)))
        for i, combo in enumerate(itertools.product(*(a.weights for a in axes)))
    ]
    # product() varies the last axis fastest: with two axes, row = first LoRA's weight, column = second's.
    rows, cols = (sizes[0], sizes[1]) if len(sizes) == 2 else (1, count)
    return AbPlan(variants, seeds, rows, cols)


def plan_variants(variants: Sequence[Sequence[LoraSpec]], seeds: list[int], max_variants: int) -> AbPlan:
    if len(variants) > max_variants:
        raise InvalidRequest(
            "variants", f"{len(variants)} variants requested; at most {max_variants} per test (AB_MAX_VARIANTS)"
        )
    _check_images(len(variants), seeds, max_variants)
    for i, loras in enumerate(variants):
        check_unique(loras, f"variants[{i}]")
    planned = [Variant(i, tuple(loras)) for i, loras in enumerate(variants)]
    return AbPlan(planned, seeds, 1, len(planned))


def _check_images(variant_count: int, seeds: list[int], max_variants: int) -> None:
    # The cap bounds the work of one test, so several seeds count against it too.
    if variant_count * len(seeds) > max_variants:
        raise InvalidRequest(
            "seeds",
            f"{variant_count} variants x {len(seeds)} seeds = {variant_count * len(seeds)} images; "
            f"at most {max_variants} per test (AB_MAX_VARIANTS)",
        )
