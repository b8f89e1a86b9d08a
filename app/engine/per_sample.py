"""Per-image low-rank deltas: one denoising loop for images that ask for different LoRA sets.

Merged weights give one LoRA set per loop. For a batch of mixed sets the UNet keeps its base
weights and each adapted layer adds, for each image, that image's adapters' `x · downᵀ · upᵀ · scale
· weight` to its output, computed per adapter on just the rows of the images that use it (S-LoRA /
Punica's idea, with batched matmuls per adapter instead of custom kernels). With classifier-free
guidance the UNet sees each image twice (the unconditional rows first), so image i owns rows
i, i + n, ... of an n-image batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from app.engine.lora_weights import LoraLayer
from app.jobs import ActiveAdapter

Target = tuple[str, str]


@contextmanager
def per_sample_deltas(targets: dict[Target, nn.Module], adapters_per_image: Sequence[Sequence[ActiveAdapter]]):
    """Within the block, the UNet's adapted layers add each image's deltas (the text encoder is untouched)."""
    n = len(adapters_per_image)
    # module -> [(layer, alpha, image indices)]: one entry per adapter (and weight) that touches it
    plan: dict[Target, dict[tuple[int, float], tuple[LoraLayer, float, list[int]]]] = {}
    for image, adapters in enumerate(adapters_per_image):
        for adapter in adapters:
            if adapter.weight == 0.0:
                continue
            for layer in adapter.weights.layers:
                if layer.component != "unet":
                    continue
                slot = plan.setdefault((layer.component, layer.module), {})
                key = (id(layer), adapter.weight)
                if key not in slot:
                    slot[key] = (layer, layer.scale * adapter.weight, [])
                slot[key][2].append(image)
    handles = [
        targets[target].register_forward_hook(_hook(list(groups.values()), n)) for target, groups in plan.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook(groups: list[tuple[LoraLayer, float, list[int]]], n: int):
    rows_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def rows_of(images: list[int], total: int, device) -> torch.Tensor:
        key = (id(images), total, device)
        if key not in rows_cache:
            repeats = total // n
            rows_cache[key] = torch.tensor([i + k * n for k in range(repeats) for i in images], device=device)
        return rows_cache[key]

    def add_deltas(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        for layer, alpha, images in groups:
            rows = rows_of(images, x.shape[0], x.device)
            delta = _delta(module, layer, x.index_select(0, rows)) * alpha
            output = output.index_add(0, rows, delta.to(output.dtype))
        return output

    return add_deltas


def _delta(module: nn.Module, layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """up(down(x)) for these rows (and the lora_B bias, when the LoRA trained one)."""
    up, down = layer.up.to(x.dtype), layer.down.to(x.dtype)
    if isinstance(module, nn.Conv2d):
        kernel = down.view(down.shape[0], module.in_channels // module.groups, *module.kernel_size)
        hidden = F.conv2d(x, kernel, None, module.stride, module.padding, module.dilation, module.groups)
        out = F.conv2d(hidden, up.view(*up.shape, 1, 1))
        bias = None if layer.up_bias is None else layer.up_bias.view(1, -1, 1, 1)
    else:
        out = (x @ down.T) @ up.T
        bias = layer.up_bias
    return out if bias is None else out + bias.to(x.dtype)
