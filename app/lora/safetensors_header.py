"""Facts from a safetensors LoRA header, read without loading tensors and without torch.

`read_lora_header` is also the safety gate that runs before a file reaches the `safetensors`
loader: it refuses pickles renamed to .safetensors, truncated or malformed files and files that
hold no LoRA weights, each with a reason a person can act on. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# The dtypes a LoRA tensor may have: safetensors name -> (bytes per element, torch dtype name).
# Integer and F8 tensors are refused: no SD 1.5 LoRA uses them. The engine maps names through this table.
FLOAT_DTYPES = {"F16": (2, "float16"), "BF16": (2, "bfloat16"), "F32": (4, "float32"), "F64": (8, "float64")}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MIB = 1024 * 1024

# (marker in the key, format, role). The module name is the key up to the marker.
# Old diffusers attention-processor keys look like "...attn1.processor.to_q_lora.down.weight".
_WEIGHT_MARKERS = (
    (".lora_down.", "kohya", "down"),
    (".lora_up.", "kohya", "up"),
    (".lora_A.", "peft", "down"),
    (".lora_B.", "peft", "up"),
    (".lora_linear_layer.down.", "diffusers", "down"),
    (".lora_linear_layer.up.", "diffusers", "up"),
    ("lora.down.", "diffusers", "down"),
    ("lora.up.", "diffusers", "up"),
)
_KOHYA_PREFIXES = ("lora_unet_", "lora_te")  # lora_te_, and lora_te1_/lora_te2_ in SDXL files
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder")
_UNET_PREFIXES = ("lora_unet_", "unet")
_UNET_BLOCKS = ("down_blocks", "up_blocks", "mid_block")  # unprefixed diffusers UNet keys


class InvalidLoraFile(ValueError):
    """The file is not a safetensors LoRA this service will load; the message says why."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # a key of FLOAT_DTYPES
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data buffer (after the header)
    end: int


@dataclass(frozen=True)
class LoraHeaderInfo:
    format: str  # "kohya", "peft", "diffusers" or "unknown"
    rank: int | None  # most common rank among down/A matrices
    ranks: list[int]
    alpha: float | None
    target_modules: int
    has_text_encoder: bool
    has_unet: bool
    dtype: str
    tensor_count: int
    size_bytes: int
    header_metadata: dict[str, str]
    data_start: int  # where the tensors' data begins in the file
    tensors: dict[str, TensorEntry]


def read_lora_header(path: Path, max_bytes: int) -> LoraHeaderInfo:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise InvalidLoraFile("file is empty (0 bytes)")
        if size > max_bytes:
            raise InvalidLoraFile(f"file is {_mb(size)} MB, the limit is {_mb(max_bytes)} MB")
        if size < 8:
            raise InvalidLoraFile(f"file is only {size} bytes; not a safetensors file")

        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0]
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            reason = f"its header length field says {header_len} bytes, the file has {size}"
            raise InvalidLoraFile(_not_safetensors(head, reason))
        header = _parse_header(f.read(header_len), head)
        data_start = 8 + header_len
        data_len = size - data_start

        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise InvalidLoraFile("header __metadata__ must map strings to strings")

        tensors = {name: _check_entry(name, entry) for name, entry in header.items()}
        _check_offsets(tensors, data_len)

        # Sort out keys before reading any data: a file with no LoRA weights is refused as is.
        formats: Counter[str] = Counter()
        down_ranks: list[int] = []
        modules: set[str] = set()
        for name, (_, shape, _) in tensors.items():
            parsed = _parse_weight_key(name)
            if parsed is None:
                continue
            fmt, module, role = parsed
            formats[fmt] += 1
            modules.add(module)
            if role == "down" and shape:
                down_ranks.append(shape[0])  # down/A is (rank, in_features[, kh, kw])
        if not modules:
            raise InvalidLoraFile(
                "no LoRA weights found (expected lora_A/lora_B, lora_down/lora_up or lora.down/lora.up keys)"
            )

        alphas = [
            _read_scalar(f, data_start, dtype, offsets)
            for name, (dtype, shape, offsets) in tensors.items()
            if name.endswith(".alpha") and _element_count(shape) == 1
        ]

    alphas = [a for a in alphas if math.isfinite(a)]  # a NaN alpha would make "most common" meaningless
    alpha = _most_common(alphas) if alphas else _alpha_from_metadata(metadata)
    return LoraHeaderInfo(
        format=_most_common_name(formats),
        rank=_most_common(down_ranks),
        ranks=sorted(set(down_ranks)),
        alpha=alpha,
        target_modules=len(modules),
        has_text_encoder=any(_is_text_encoder(m) for m in modules),
        has_unet=any(_is_unet(m) for m in modules),
        dtype=_most_common_name(Counter(dtype for dtype, _, _ in tensors.values())),
        tensor_count=len(tensors),
        size_bytes=size,
        header_metadata=dict(metadata),
        data_start=data_start,
        tensors={name: TensorEntry(dtype, tuple(shape), *offsets) for name, (dtype, shape, offsets) in tensors.items()},
    )


def _mb(n: int) -> str:
    value = n / MIB
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _not_safetensors(head: bytes, reason: str) -> str:
    # torch.save writes a zip archive; older torch and plain pickle start with the PROTO opcode 0x80.
    if head.startswith(b"PK\x03\x04") or (head[0] == 0x80 and 2 <= head[1] <= 5):
        return (
            "not a safetensors file: it looks like a pickle/PyTorch checkpoint renamed to .safetensors; "
            "only safetensors files are loaded"
        )
    return f"not a safetensors file: {reason}"


def _parse_header(raw: bytes, head: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidLoraFile(_not_safetensors(head, "its header is not UTF-8 text")) from None
    except (json.JSONDecodeError, RecursionError):
        raise InvalidLoraFile(_not_safetensors(head, "its header is not valid JSON")) from None
    if not isinstance(header, dict):
        kind = type(header).__name__
        raise InvalidLoraFile(f"not a safetensors file: its header is a JSON {kind}, not an object")
    return header


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(name: str, entry: object) -> tuple[str, list[int], tuple[int, int]]:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise InvalidLoraFile(f"tensor {name} is missing dtype, shape or data_offsets in the header")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in FLOAT_DTYPES:
        raise InvalidLoraFile(
            f"tensor {name} has dtype {dtype}; LoRA tensors must be floating point (F16, BF16, F32 or F64)"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InvalidLoraFile(f"tensor {name} has an invalid shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise InvalidLoraFile(f"tensor {name} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if end < begin:
        raise InvalidLoraFile(f"tensor {name} has data_offsets [{begin}, {end}] that run backwards")
    needed = _element_count(shape) * FLOAT_DTYPES[dtype][0]
    if end - begin != needed:
        raise InvalidLoraFile(
            f"tensor {name} has shape {shape} and dtype {dtype}, which needs {needed} bytes, "
            f"but its data_offsets span {end - begin} bytes"
        )
    return dtype, shape, (begin, end)


def _check_offsets(tensors: dict[str, tuple[str, list[int], tuple[int, int]]], data_len: int) -> None:
    """Tensors must tile the data buffer exactly, as the safetensors loader itself requires."""
    previous_name, previous_end = None, 0
    for name, (_, _, (begin, end)) in sorted(tensors.items(), key=lambda item: item[1][2]):
        if begin < previous_end:
            raise InvalidLoraFile(f"tensor {name} overlaps tensor {previous_name} in the data buffer")
        if begin > previous_end:
            raise InvalidLoraFile(
                f"tensor {name} starts at byte {begin} but the data before it ends at byte {previous_end}; "
                "safetensors data must be contiguous"
            )
        if end > data_len:
            raise InvalidLoraFile(
                f"file is truncated: tensor {name} needs bytes up to {end} but the data holds only {data_len}"
            )
        previous_name, previous_end = name, end
    if previous_end != data_len:
        raise InvalidLoraFile(
            f"file has {data_len - previous_end} unexpected bytes after the last tensor; "
            "not a safetensors file"
        )


def _parse_weight_key(name: str) -> tuple[str, str, str] | None:
    """(format, module, role) for a LoRA matrix key, None for anything else (alpha, extras)."""
    for marker, fmt, role in _WEIGHT_MARKERS:
        index = name.find(marker)
        if index > 0:
            module = name[:index].rstrip("._")
            if fmt == "kohya" and not module.startswith(_KOHYA_PREFIXES):
                fmt = "unknown"  # kohya-style suffix without a kohya prefix: not a layout we know
            return fmt, module, role
    return None


def _is_text_encoder(module: str) -> bool:
    return module.startswith(_TEXT_ENCODER_PREFIXES) or "text_model" in module


def _is_unet(module: str) -> bool:
    if _is_text_encoder(module):
        return False
    return module.startswith(_UNET_PREFIXES) or any(block in module for block in _UNET_BLOCKS)


def _element_count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _read_scalar(f, data_start: int, dtype: str, offsets: tuple[int, int]) -> float:
    # Offsets were checked against the file size above, so this read is always complete.
    f.seek(data_start + offsets[0])
    raw = f.read(offsets[1] - offsets[0])
    if dtype == "BF16":
        return struct.unpack("<f", b"\x00\x00" + raw)[0]  # bf16 is the top half of an f32
    return struct.unpack({"F16": "<e", "F32": "<f", "F64": "<d"}[dtype], raw)[0]


def _alpha_from_metadata(metadata: dict[str, str]) -> float | None:
    """PEFT/diffusers files carry alpha in the header metadata, if anywhere."""
    candidates = [metadata.get("lora_alpha")]
    # diffusers' save_lora_weights stores the PEFT config as JSON, keys prefixed "unet."/"text_encoder.".
    try:
        packed = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        packed = {}
    if isinstance(packed, dict):
        candidates += [packed.get("lora_alpha"), packed.get("unet.lora_alpha")]
        candidates += [v for k, v in sorted(packed.items()) if k.endswith(".lora_alpha")]
    for value in candidates:
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


def _most_common(values: list):
    """Most frequent value; ties go to the larger one so the answer does not depend on key order."""
    if not values:
        return None
    counts = Counter(values)
    return max(counts, key=lambda value: (counts[value], value))


def _most_common_name(counts: Counter[str]) -> str:
    if not counts:
        return "unknown"
    return max(sorted(counts), key=lambda name: counts[name])
