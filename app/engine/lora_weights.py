"""Turn a LoRA file into low-rank factors for the layers of the loaded model.

Reading uses diffusers' own state-dict conversion (kohya / PEFT / old diffusers key formats) and the
same LoraConfig derivation `load_lora_weights` uses, so the per-layer scale is exactly diffusers'.
Instead of injecting PEFT layers (which slow every denoising step), the factors are merged into the
weights (app/engine/merge.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

# Imported at module load, not lazily in the functions: diffusers' lazy attribute imports are not
# safe when two threads resolve them at once.
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
from diffusers.utils.peft_utils import _create_lora_config
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from peft.utils.other import get_pattern_key
from torch import nn

from app.lora.safetensors_header import FLOAT_DTYPES, LoraHeaderInfo

COMPONENTS = ("unet", "text_encoder")


class LoraIncompatibleError(ValueError):
    """The file is a LoRA, but not one this engine can apply to the loaded model."""


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: delta = scale * (up @ down), reshaped to the layer's weight shape."""

    component: str  # "unet" or "text_encoder"
    module: str  # module name inside the component
    up: torch.Tensor  # (out_features, rank)
    down: torch.Tensor  # (rank, in_features * kernel_h * kernel_w)
    scale: float  # PEFT's scaling: lora_alpha / r (before the adapter weight)
    up_bias: torch.Tensor | None = None  # lora_B bias, when the LoRA trained one


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA's factors, on the engine's device, ready to be merged."""

    layers: tuple[LoraLayer, ...]


def read_lora_file(path: Path, header: LoraHeaderInfo) -> list[LoraLayer]:
    """Read a `.safetensors` LoRA (whose header passed the gate) into float32 CPU factors with diffusers' scales."""
    # The file is read here (one read, tensors as views of it) and handed to diffusers as a dict, so
    # the key conversion is still diffusers' own; its per-tensor loader cost 10-30 ms per LoRA on CPU.
    file_state, metadata = _read_tensors(path, header)
    state_dict, network_alphas, _ = StableDiffusionPipeline.lora_state_dict(
        file_state, use_safetensors=True, return_lora_metadata=True
    )
    if not state_dict:
        raise LoraIncompatibleError("the file holds no LoRA weights")
    not_lora = [k for k in state_dict if "lora" not in k]
    if not_lora:
        raise LoraIncompatibleError(f"keys without 'lora' in their name, e.g. {not_lora[0]!r}: not a LoRA file")
    if any("lora_magnitude_vector" in k or "dora_scale" in k for k in state_dict):
        raise LoraIncompatibleError("DoRA adapters are not supported; export a plain LoRA")
    if any(".lokr_" in k or ".hada_" in k for k in state_dict):
        raise LoraIncompatibleError("LoKr/LoHa adapters are not supported; export a plain LoRA")

    layers = []
    for component in COMPONENTS:
        layers += _component_layers(component, state_dict, network_alphas, metadata)
    unknown = {k.split(".", 1)[0] for k in state_dict} - set(COMPONENTS)
    if unknown:
        # Applying only the part that fits would silently half-apply the LoRA (e.g. SDXL's text_encoder_2).
        raise LoraIncompatibleError(
            f"layers for {', '.join(sorted(unknown))}, which SD 1.5 does not have "
            "(a LoRA for another base model such as SDXL, or an unsupported key layout)"
        )
    if not layers:
        raise LoraIncompatibleError("no UNet or text-encoder LoRA layers found")
    not_finite = next((f"{x.component}.{x.module}" for x in layers if not _finite(x)), None)
    if not_finite is not None:
        raise LoraIncompatibleError(f"layer {not_finite} holds NaN or infinite values")
    return layers


def _finite(layer: LoraLayer) -> bool:
    tensors = (layer.up, layer.down) if layer.up_bias is None else (layer.up, layer.down, layer.up_bias)
    return all(bool(torch.isfinite(t).all()) for t in tensors)


_LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights puts LoraConfig args


def _read_tensors(path: Path, header: LoraHeaderInfo) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, diffusers' LoRA adapter metadata) of a file whose header the gate parsed and checked.

    The file's bytes are read once; every tensor is a view into that buffer (which it keeps alive).
    """
    data = bytearray(Path(path).read_bytes())
    if len(data) != header.size_bytes:
        raise LoraIncompatibleError("the file changed while it was being loaded; try again")
    tensors = {}
    for key, entry in header.tensors.items():
        dtype = getattr(torch, FLOAT_DTYPES[entry.dtype][1])
        if entry.end == entry.begin:
            tensors[key] = torch.empty(entry.shape, dtype=dtype)
        else:
            count = (entry.end - entry.begin) // FLOAT_DTYPES[entry.dtype][0]
            offset = header.data_start + entry.begin
            tensors[key] = torch.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(entry.shape)
    raw = header.header_metadata.get(_LORA_ADAPTER_METADATA_KEY)
    return tensors, (json.loads(raw) if raw else None)


def _component_layers(component, state_dict, network_alphas, metadata) -> list[LoraLayer]:
    prefix = f"{component}."
    sd = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sd:
        return []
    meta = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)} if metadata else None
    alphas = None
    if network_alphas:
        alphas = {k.removeprefix(prefix): v for k, v in network_alphas.items() if k.startswith(prefix)}

    # The same conversions diffusers applies in load_lora_adapter / _load_lora_into_text_encoder.
    if component == "unet":
        if "lora_A" not in next(iter(sd)):
            sd = convert_unet_state_dict_to_peft(sd)
        ranks = {f"^{k}": v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
    else:
        sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
        ranks = {k: v.shape[1] for k, v in sd.items() if "lora_B" in k and k.endswith(".weight") and v.ndim > 1}
    if not ranks:
        return []
    config = _create_lora_config(sd, alphas, meta, ranks, is_unet=component == "unet")

    layers = []
    for module in sorted({k.split(".lora_", 1)[0] for k in sd}):
        down, up = sd.get(f"{module}.lora_A.weight"), sd.get(f"{module}.lora_B.weight")
        if down is None or up is None:
            raise LoraIncompatibleError(f"layer {component}.{module} has only one of its two LoRA matrices")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        bias = sd.get(f"{module}.lora_B.bias")
        layers.append(
            LoraLayer(
                component=component,
                module=module,
                up=up.detach().to(torch.float32).flatten(1),
                down=down.detach().to(torch.float32).flatten(1),
                scale=float(scale),
                up_bias=None if bias is None else bias.detach().to(torch.float32),
            )
        )
    return layers


def fit_layers(
    layers: Iterable[LoraLayer], targets: dict[tuple[str, str], nn.Module], device, dtype
) -> LoraWeights:
    """Match layers to the model's modules, check shapes, and move the factors to the device.

    A LoRA for another architecture (SDXL, SD 2.x) is refused here with the reason, rather than
    silently ignoring its unmatched keys.
    """
    fitted, missing, misshapen = [], [], []
    for layer in layers:
        module = _find_module(targets, layer.component, layer.module)
        if module is None:
            missing.append(f"{layer.component}.{layer.module}")
            continue
        weight = module.weight
        expected = (weight.shape[0], math.prod(weight.shape[1:]))
        rank_matches = layer.up.shape[1] == layer.down.shape[0]
        if (layer.up.shape[0], layer.down.shape[1]) != expected or not rank_matches:
            misshapen.append(
                f"{layer.component}.{layer.module} (LoRA {tuple(layer.up.shape[:1])}x{tuple(layer.down.shape[1:])},"
                f" model {tuple(weight.shape)})"
            )
            continue
        # Factors stay float32 where the model is float32; on a float16 GPU they are kept in the model
        # dtype to halve their memory, and the product is still accumulated in float32 when merging.
        fitted.append(
            LoraLayer(
                component=layer.component,
                module=_module_name(targets, layer.component, layer.module),
                up=layer.up.to(device=device, dtype=dtype),
                down=layer.down.to(device=device, dtype=dtype),
                scale=layer.scale,
                up_bias=None if layer.up_bias is None else layer.up_bias.to(device=device, dtype=dtype),
            )
        )
    if missing or misshapen:
        total = len(missing) + len(misshapen) + len(fitted)
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {total} layers do not exist in the loaded model (e.g. {missing[0]})")
        if misshapen:
            parts.append(f"{len(misshapen)} of {total} layers have the wrong shape (e.g. {misshapen[0]})")
        raise LoraIncompatibleError(
            "this LoRA does not fit the loaded Stable Diffusion 1.5 model: "
            + "; ".join(parts)
            + ". Was it trained for another base model (SDXL, SD 2.x)?"
        )
    return LoraWeights(layers=tuple(fitted))


def _module_name(targets, component: str, module: str) -> str:
    for name in _name_variants(module):
        if (component, name) in targets:
            return name
    return module


def _find_module(targets, component: str, module: str) -> nn.Module | None:
    return targets.get((component, _module_name(targets, component, module)))


def _name_variants(module: str) -> tuple[str, ...]:
    # Recent transformers flatten CLIPTextModel (no `text_model.`); older LoRA files still carry it.
    if module.startswith("text_model."):
        return (module, module.removeprefix("text_model."))
    return (module, f"text_model.{module}")


def adaptable_modules(components: dict[str, nn.Module]) -> dict[tuple[str, str], nn.Module]:
    """Every Linear / Conv2d layer a LoRA may target, keyed by (component, module name)."""
    return {
        (component, name): module
        for component, model in components.items()
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    }
