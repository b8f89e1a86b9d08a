"""Turn a LoRA file into low-rank factors for the layers of the loaded model.

Reading uses diffusers' own state-dict conversion (kohya / PEFT / old diffusers key formats) and the
same LoraConfig derivation `load_lora_weights` uses, so the per-layer scale is exactly diffusers'.
Instead of injecting PEFT layers (which slow every denoising step), the factors are merged into the
weights (app/engine/merge.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
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

from app.engine.cpu_threads import one_cpu_thread
from app.lora.registry import Fingerprint, fingerprint_of
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
    """A LoRA's factors on one device, ready to be merged, and the sha256 of the file they came from."""

    layers: tuple[LoraLayer, ...]
    sha256: str
    fingerprint: Fingerprint | None = None  # of the file as read: the version `sha256` is the hash of

    @cached_property
    def nbytes(self) -> int:
        # Cached: the host tier weighs its entries on every put (frozen dataclass, so no __setattr__).
        return sum(t.numel() * t.element_size() for layer in self.layers for t in _tensors(layer))

    def pin_memory(self) -> LoraWeights:
        """Page-locked host copies (a GPU copies from them without a staging copy)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device) -> LoraWeights:
        """The same factors on `device` (host -> GPU copies from pinned memory run asynchronously)."""
        return self._map(lambda t: t.to(device, non_blocking=t.is_pinned()))

    def _map(self, fn) -> LoraWeights:
        layers = tuple(
            LoraLayer(x.component, x.module, fn(x.up), fn(x.down), x.scale, _maybe(fn, x.up_bias)) for x in self.layers
        )
        return LoraWeights(layers, self.sha256, self.fingerprint)


def _maybe(fn, tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else fn(tensor)


def _tensors(layer: LoraLayer) -> tuple[torch.Tensor, ...]:
    return (layer.up, layer.down) if layer.up_bias is None else (layer.up, layer.down, layer.up_bias)


def read_lora_file(
    path: Path, header: LoraHeaderInfo, known_sha256: tuple[Fingerprint, str] | None = None
) -> tuple[list[LoraLayer], str, Fingerprint]:
    """Read a `.safetensors` LoRA (whose header passed the gate) into CPU factors with diffusers' scales.

    Returns the layers (tensors in the file's dtype, views of the one buffer read), the sha256 of those
    bytes and the file's fingerprint as read. `known_sha256` is (fingerprint, sha256) of a version
    hashed before: when the file read has that fingerprint, its bytes are not hashed again (on a 61 MiB
    rank-64 file the hash took 35 ms, the rest of the read 30). Otherwise they are hashed on another
    thread while the keys are converted (hashlib releases the GIL).
    """
    # The file is read here (one read, tensors as views of it) and handed to diffusers as a dict, so
    # the key conversion is still diffusers' own; its per-tensor loader cost 10-30 ms per LoRA on CPU.
    data, fingerprint = _read_bytes(path, header)
    if known_sha256 is not None and known_sha256[0] == fingerprint:
        hashing = None
    else:
        hashing = _WORKERS.submit(lambda: hashlib.sha256(data).hexdigest())
    file_state, metadata = _tensors_of(data, header)
    # NaN/inf in the file's own values, checked beside the key conversion (torch releases the GIL too).
    checking = _WORKERS.submit(_check_off_thread, dict(file_state))  # diffusers pops keys as it converts
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
    bad = checking.result()
    if bad is not None:
        raise LoraIncompatibleError(f"tensor {bad} holds NaN or infinite values")
    return layers, (known_sha256[1] if hashing is None else hashing.result()), fingerprint


def _first_not_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of a tensor holding NaN or inf, or None.

    The largest |value| of finite values is finite, and NaN propagates through `amax`: one fast
    reduction per tensor (measured on 26M float32 values: 27 ms, against 160 ms for an `isfinite`
    mask per tensor and 115 ms for `vector_norm(inf)`), with one host sync for all of them.
    """
    names = [name for name, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not names:
        return None
    peaks = torch.stack([tensors[name].abs().amax().float() for name in names])
    if bool(peaks.isfinite().all()):
        return None
    return names[int((~peaks.isfinite()).nonzero()[0])]


def _check_off_thread(tensors: dict[str, torch.Tensor]) -> str | None:
    with one_cpu_thread():  # beside a generation: see app/engine/cpu_threads.py
        return _first_not_finite(tensors)


_LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights puts LoraConfig args


# Hashing and value checks of a file being loaded run here, beside the key conversion.
_WORKERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lora-read")


def _read_bytes(path: Path, header: LoraHeaderInfo) -> tuple[bytearray, Fingerprint]:
    """The file's bytes, read straight into one writable buffer (no second copy of tens of MB), and
    the fingerprint of the file they were read from (taken from the open file)."""
    data = bytearray(header.size_bytes)
    with open(path, "rb") as f:
        fingerprint = fingerprint_of(os.fstat(f.fileno()))
        read = f.readinto(data)
        if read != header.size_bytes or f.read(1):
            raise LoraIncompatibleError("the file changed while it was being loaded; try again")
    return data, fingerprint


def _tensors_of(data: bytearray, header: LoraHeaderInfo) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, diffusers' LoRA adapter metadata) of a file whose header the gate parsed and checked.

    Every tensor is a view into the file's one buffer (which it keeps alive).
    """
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
                up=up.detach().flatten(1),
                down=down.detach().flatten(1),
                scale=float(scale),
                up_bias=None if bias is None else bias.detach(),
            )
        )
    return layers


def fit_layers(
    layers: list[LoraLayer],
    targets: dict[tuple[str, str], nn.Module],
    device,
    dtype,
    sha256: str,
    fingerprint: Fingerprint | None = None,
) -> LoraWeights:
    """Match layers to the model's modules, check shapes and values, convert the factors to the model's
    dtype (one conversion, from the file's dtype) on `device`.

    A LoRA for another architecture (SDXL, SD 2.x) is refused here with the reason, rather than
    silently ignoring its unmatched keys.
    """
    fitted, missing, misshapen = [], [], []
    for layer in layers:
        module = _find_module(targets, layer.component, layer.module)
        if module is None:
            missing.append(f"{layer.component}.{layer.module}")
            continue
        if layer.up_bias is not None and module.bias is None:
            # Merging adds the delta to the layer's weights and bias; this layer has no bias to hold it.
            raise LoraIncompatibleError(
                f"layer {layer.component}.{layer.module} has a lora_B bias, but the model's layer has no bias: "
                "the service merges LoRAs into the weights and cannot apply it (PEFT cannot merge it either). "
                "Export the LoRA without lora_bias."
            )
        weight = module.weight
        expected = (weight.shape[0], math.prod(weight.shape[1:]))
        rank_matches = layer.up.shape[1] == layer.down.shape[0]
        if (layer.up.shape[0], layer.down.shape[1]) != expected or not rank_matches:
            misshapen.append(
                f"{layer.component}.{layer.module} (LoRA {tuple(layer.up.shape[:1])}x{tuple(layer.down.shape[1:])},"
                f" model {tuple(weight.shape)})"
            )
            continue
        # Factors are kept in the model's dtype: float32 on a float32 model; on a float16 GPU half the
        # memory, and the product is still accumulated in float32 when merging.
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
    if any(torch.finfo(t.dtype).max > torch.finfo(dtype).max for layer in layers for t in _tensors(layer)):
        # Narrowed to the model's dtype (e.g. float32 -> float16): a value it cannot hold became inf.
        bad = _first_not_finite({f"{x.component}.{x.module}.{i}": t for x in fitted for i, t in enumerate(_tensors(x))})
        if bad is not None:
            raise LoraIncompatibleError(f"layer {bad.rsplit('.', 1)[0]} holds values {dtype} cannot represent")
    return LoraWeights(tuple(fitted), sha256, fingerprint)


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
