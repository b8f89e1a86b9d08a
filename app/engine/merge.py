"""Merging a LoRA set into the model's weights, and taking it out again.

Adapters are kept resident as low-rank factors; the set a job asks for is written into the weights
just before it runs: `W = W0 + sum(weight * scale * up @ down)`, from pristine copies of the touched
weights, only when the set differs from the one merged now. So a denoising step costs what a base step
costs, the base comes back bit for bit, and compiled code stays valid (weights change in place).
The caller serialises calls (the engine's generation lock).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from app.engine.lora_weights import LoraLayer
from app.jobs import ActiveAdapter

Target = tuple[str, str]  # (component, module name)
COMPONENTS = ("unet", "text_encoder")


class AdapterMerger:
    def __init__(self, targets: dict[Target, nn.Module]):
        self.targets = targets
        # Per merged module: (weight, pristine weight, bias, pristine bias), see `_views`.
        self._pristine: dict[Target, tuple] = {}
        self._merged_modules: set[Target] = set()
        self._merged_biases: set[Target] = set()  # only LoRAs with a lora_B bias change biases
        # What is merged now: the components, then (key, weights object, weight) per adapter. Objects,
        # not keys, so that a reloaded file under the same key never matches the stale merge.
        self._merged_set: tuple = ()

    def activate(self, adapters: Sequence[ActiveAdapter], components: tuple[str, ...] = COMPONENTS) -> bool:
        """Make the weights equal base + `adapters` (their layers of `components`; every other module
        gets its base weights), touching only what changes. True when anything changed.

        Adapters are merged in key order so that the order of a request's list cannot change the bits.
        Weight-0 adapters are left out: W + 0 * delta is W.
        """
        wanted = sorted((a for a in adapters if a.weight != 0.0), key=lambda a: a.key)
        signature = (components, *((a.key, a.weights, a.weight) for a in wanted))
        if len(signature) == len(self._merged_set) and signature[0] == self._merged_set[0] and all(
            k1 == k2 and w1 is w2 and x1 == x2
            for (k1, w1, x1), (k2, w2, x2) in zip(signature[1:], self._merged_set[1:], strict=True)
        ):
            return False
        plan: dict[Target, list[tuple[LoraLayer, float]]] = {}
        for adapter in wanted:
            for layer in adapter.weights.layers:
                if layer.component in components:
                    plan.setdefault((layer.component, layer.module), []).append((layer, adapter.weight))
        with torch.no_grad():
            # Only modules the new set leaves alone need their pristine weights back: the merge below
            # overwrites the others completely, so restoring them first would be a wasted copy.
            self._merged_set = ()  # if a merge fails half-way, the next request redoes it
            for target in self._merged_modules - plan.keys():
                self._restore(target)
            self._merged_modules &= plan.keys()
            for target, layers in plan.items():
                self._merge(target, layers)
                self._merged_modules.add(target)
        self._merged_set = signature
        return True

    def restore_base(self) -> None:
        """Put the pristine base weights back (and let go of the adapters merged last)."""
        with torch.no_grad():
            for target in self._merged_modules:
                self._restore(target)
        self._merged_modules.clear()
        self._merged_set = ()

    def _merge(self, target: Target, layers: list[tuple[LoraLayer, float]]) -> None:
        """weight = weight0 + sum(w * scale * up @ down), written straight into the module's weight.

        Switching cost on CPU is per-op overhead, not arithmetic (the products are small), so the common
        case is one fused `addmm` per layer into the weight's own storage: no temporaries, no restore
        copy, no host sync. A float32 model accumulates in float32 (one rounding per adapter; a float64
        merge cost 3x the time for no measurable pixel difference against diffusers). On a float16 GPU,
        one adapter is still one `addmm` (cuBLAS accumulates in float32 and rounds once); several
        adapters on one layer are summed in a float32 buffer and rounded once.
        """
        weight, weight0, bias, bias0 = self._views(target)
        if len(layers) == 1 or weight.dtype == torch.float32:
            out = weight
            first = weight0
        else:
            out = weight0.to(torch.float32)
            first = out
        for i, (layer, adapter_weight) in enumerate(layers):
            up, down = layer.up, layer.down
            if out.dtype != up.dtype:
                up, down = up.to(out.dtype), down.to(out.dtype)
            alpha = layer.scale * adapter_weight
            if i == 0 and out is weight:
                torch.addmm(first, up, down, alpha=alpha, out=out)
            else:
                out.addmm_(up, down, alpha=alpha)
        if out is not weight:
            weight.copy_(out)
        bias_layers = [(layer, w) for layer, w in layers if layer.up_bias is not None]
        if bias is not None and bias_layers:
            total = bias0.to(torch.float32, copy=True)  # a copy: the pristine bias must stay pristine
            for layer, adapter_weight in bias_layers:
                total.add_(layer.up_bias.to(torch.float32), alpha=layer.scale * adapter_weight)
            bias.copy_(total)
            self._merged_biases.add(target)
        elif target in self._merged_biases:  # the previous set changed this bias, the new one does not
            bias.copy_(bias0)
            self._merged_biases.discard(target)

    def _views(self, target: Target):
        """(weight, pristine weight, bias, pristine bias) of a module, weights as 2-D (out, in*kh*kw) views.

        The pristine copy is taken the first time a module is merged; the views share storage with the
        module's parameters, so writing into them changes the model without a `.to()` or reallocation.
        """
        views = self._pristine.get(target)
        if views is None:
            module = self.targets[target]
            weight = module.weight.detach()
            bias = None if module.bias is None else module.bias.detach()
            rows = weight.shape[0]
            views = (
                weight.view(rows, -1),
                weight.clone().view(rows, -1),
                bias,
                None if bias is None else bias.clone(),
            )
            self._pristine[target] = views
        return views

    def _restore(self, target: Target) -> None:
        weight, weight0, bias, bias0 = self._pristine[target]
        weight.copy_(weight0)
        if target in self._merged_biases:
            bias.copy_(bias0)
            self._merged_biases.discard(target)
