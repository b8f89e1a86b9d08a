import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from app.lora.safetensors_header import InvalidLoraFile, read_lora_header

LIMIT = 64 * 1024 * 1024
KOHYA_UNET = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{}"
KOHYA_TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
PEFT_UNET = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{}"
PEFT_TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def kohya_tensors(module: str, rank: int, alpha: float, dtype=np.float16, dim: int = 320) -> dict:
    rng = np.random.default_rng(rank)
    return {
        f"{module}.lora_down.weight": rng.standard_normal((rank, dim)).astype(np.float16),
        f"{module}.lora_up.weight": rng.standard_normal((dim, rank)).astype(np.float16),
        f"{module}.alpha": np.array(alpha, dtype=dtype),
    }


def peft_tensors(module: str, rank: int, dim: int = 320) -> dict:
    rng = np.random.default_rng(rank)
    return {
        f"{module}.lora_A.weight": rng.standard_normal((rank, dim)).astype(np.float32),
        f"{module}.lora_B.weight": np.zeros((dim, rank), dtype=np.float32),
    }


def write_kohya(path: Path) -> Path:
    tensors = {}
    tensors |= kohya_tensors(KOHYA_UNET.format("q"), rank=4, alpha=2.0)
    tensors |= kohya_tensors(KOHYA_UNET.format("k"), rank=4, alpha=2.0)
    tensors |= kohya_tensors(KOHYA_UNET.format("v"), rank=8, alpha=2.0)
    tensors |= kohya_tensors(KOHYA_TE, rank=4, alpha=2.0)
    save_file(tensors, str(path), metadata={"ss_network_dim": "4"})
    return path


def write_raw(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file written by hand, to build files the library would refuse to write."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def raise_message(path: Path, max_bytes: int = LIMIT) -> str:
    with pytest.raises(InvalidLoraFile) as exc:
        read_lora_header(path, max_bytes)
    return str(exc.value)


# -- facts from valid files ---------------------------------------------------------------------


def test_kohya_file(tmp_path: Path):
    path = write_kohya(tmp_path / "k.safetensors")
    info = read_lora_header(path, LIMIT)
    assert info.format == "kohya"
    assert info.rank == 4  # three of four modules
    assert info.ranks == [4, 8]
    assert info.alpha == 2.0
    assert info.target_modules == 4
    assert info.has_text_encoder and info.has_unet
    assert info.dtype == "F16"
    assert info.tensor_count == 12
    assert info.size_bytes == path.stat().st_size
    assert info.header_metadata == {"ss_network_dim": "4"}
    assert info.ranks == [4, 8]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_kohya_alpha_is_read_from_its_tensor(tmp_path: Path, dtype):
    path = tmp_path / "k.safetensors"
    save_file(kohya_tensors(KOHYA_UNET.format("q"), rank=4, alpha=3.5, dtype=dtype), str(path))
    info = read_lora_header(path, LIMIT)
    assert info.alpha == 3.5
    assert not info.has_text_encoder


def test_kohya_bf16_alpha(tmp_path: Path):
    module = KOHYA_UNET.format("q")
    f16 = np.zeros((2, 4), dtype=np.float16).tobytes()
    bf16_alpha = struct.pack("<f", 3.5)[2:]  # bf16 is the top half of an f32
    header = {
        f"{module}.lora_down.weight": {"dtype": "F16", "shape": [2, 4], "data_offsets": [0, 16]},
        f"{module}.lora_up.weight": {"dtype": "F16", "shape": [4, 2], "data_offsets": [16, 32]},
        f"{module}.alpha": {"dtype": "BF16", "shape": [], "data_offsets": [32, 34]},
    }
    path = write_raw(tmp_path / "bf16.safetensors", header, f16 + f16 + bf16_alpha)
    info = read_lora_header(path, LIMIT)
    assert info.alpha == 3.5
    assert info.rank == 2


def test_peft_file_unet_only(tmp_path: Path):
    path = tmp_path / "p.safetensors"
    save_file(peft_tensors(PEFT_UNET.format("q"), 8) | peft_tensors(PEFT_UNET.format("k"), 8), str(path))
    info = read_lora_header(path, LIMIT)
    assert info.format == "peft"
    assert (info.rank, info.ranks) == (8, [8])
    assert info.alpha is None  # no alpha tensor and no metadata
    assert info.target_modules == 2
    assert info.has_unet and not info.has_text_encoder
    assert info.dtype == "F32"


def test_peft_file_with_text_encoder_and_alpha_metadata(tmp_path: Path):
    path = tmp_path / "p.safetensors"
    tensors = peft_tensors(PEFT_UNET.format("q"), 16) | peft_tensors(PEFT_TE, 16)
    save_file(tensors, str(path), metadata={"lora_alpha": "16"})
    info = read_lora_header(path, LIMIT)
    assert info.alpha == 16.0
    assert info.has_text_encoder and info.has_unet
    assert info.target_modules == 2


def test_peft_alpha_from_diffusers_adapter_metadata(tmp_path: Path):
    path = tmp_path / "p.safetensors"
    packed = json.dumps({"unet.lora_alpha": 8, "unet.r": 4})
    save_file(peft_tensors(PEFT_UNET.format("q"), 4), str(path), metadata={"lora_adapter_metadata": packed})
    assert read_lora_header(path, LIMIT).alpha == 8.0


@pytest.mark.parametrize(
    "down_key",
    [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_linear_layer.down.weight",
    ],
)
def test_old_diffusers_file(tmp_path: Path, down_key: str):
    up_key = down_key.replace("down.weight", "up.weight")
    path = tmp_path / "d.safetensors"
    save_file({down_key: np.zeros((4, 320), np.float16), up_key: np.zeros((320, 4), np.float16)}, str(path))
    info = read_lora_header(path, LIMIT)
    assert (info.format, info.rank, info.target_modules, info.has_unet) == ("diffusers", 4, 1, True)


def test_kohya_suffix_without_kohya_prefix_is_unknown_format(tmp_path: Path):
    path = tmp_path / "u.safetensors"
    tensors = {
        "foo.lora_down.weight": np.zeros((2, 8), np.float16),
        "foo.lora_up.weight": np.zeros((8, 2), np.float16),
    }
    save_file(tensors, str(path))
    assert read_lora_header(path, LIMIT).format == "unknown"


# -- refused files ------------------------------------------------------------------------------


class _CreatesMarker:
    """Unpickling this creates a file: proof of whether a loader ran pickle code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_renamed_is_refused_without_running_it(tmp_path: Path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesMarker(marker))
    path = tmp_path / "evil.safetensors"
    path.write_bytes(payload)

    message = raise_message(path)
    assert "pickle/PyTorch checkpoint" in message
    assert "only safetensors files are loaded" in message
    assert not marker.exists()

    # The payload is live: unpickling it does create the marker, so the check above means something.
    pickle.loads(payload).close()
    assert marker.exists()


def test_torch_zip_checkpoint_is_refused(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"PK\x03\x04" + b"\x14\x00\x00\x00" + b"archive/data.pkl" * 20)
    assert "pickle/PyTorch checkpoint" in raise_message(path)


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert raise_message(path) == "file is empty (0 bytes)"


def test_shorter_than_length_field(tmp_path: Path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"{}")
    assert "not a safetensors file" in raise_message(path)


def test_truncated_file(tmp_path: Path):
    data = write_kohya(tmp_path / "full.safetensors").read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[: len(data) // 2])
    header_len = struct.unpack("<Q", data[:8])[0]
    assert 8 + header_len < len(data) // 2  # the cut is in the data, not in the header
    message = raise_message(path)
    assert message.startswith("file is truncated: tensor ")
    assert f"the data holds only {len(data) // 2 - 8 - header_len}" in message


def test_truncated_inside_header(tmp_path: Path):
    data = write_kohya(tmp_path / "full.safetensors").read_bytes()
    path = tmp_path / "stub.safetensors"
    path.write_bytes(data[:100])
    assert "not a safetensors file" in raise_message(path)


def test_integer_dtype(tmp_path: Path):
    path = tmp_path / "int.safetensors"
    module = KOHYA_UNET.format("q")
    save_file(
        {
            f"{module}.lora_down.weight": np.zeros((4, 8), np.int64),
            f"{module}.lora_up.weight": np.zeros((8, 4), np.float16),
        },
        str(path),
    )
    message = raise_message(path)
    assert f"tensor {module}.lora_down.weight has dtype I64" in message
    assert "floating point" in message


def test_f8_dtype_is_refused(tmp_path: Path):
    header = {"a.lora_A.weight": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}
    assert "F8_E4M3" in raise_message(write_raw(tmp_path / "f8.safetensors", header, b"\x00\x00"))


def test_over_the_size_limit(tmp_path: Path):
    path = write_kohya(tmp_path / "k.safetensors")
    size = path.stat().st_size
    message = raise_message(path, max_bytes=size - 1)
    assert message.startswith("file is ") and "the limit is" in message
    assert read_lora_header(path, max_bytes=size).size_bytes == size  # the limit itself is allowed


def test_big_file_message_in_megabytes(tmp_path: Path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.truncate(3 * 1024 * 1024)  # sparse: cheap to create
    assert raise_message(path, max_bytes=2 * 1024 * 1024) == "file is 3.0 MB, the limit is 2.0 MB"


def test_absurd_header_length(tmp_path: Path):
    path = tmp_path / "absurd.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    message = raise_message(path)
    assert "not a safetensors file" in message
    assert "pickle" not in message


def test_header_length_over_100_mb_is_refused_before_reading(tmp_path: Path):
    path = tmp_path / "huge-header.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 101 * 1024 * 1024))
        f.truncate(102 * 1024 * 1024)
    assert "not a safetensors file" in raise_message(path, max_bytes=200 * 1024 * 1024)


@pytest.mark.parametrize(
    ("raw", "words"),
    [(b"not json at all", "not valid JSON"), (b"[1, 2]", "not an object"), (b"\xff\xfe{}", "not UTF-8")],
)
def test_header_not_a_json_object(tmp_path: Path, raw: bytes, words: str):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert words in raise_message(path)


def test_entry_missing_fields(tmp_path: Path):
    header = {"a.lora_A.weight": {"dtype": "F16", "shape": [2]}}
    message = raise_message(write_raw(tmp_path / "m.safetensors", header, b"\x00" * 4))
    assert "a.lora_A.weight" in message and "data_offsets" in message


def test_metadata_must_be_strings(tmp_path: Path):
    header = {
        "__metadata__": {"steps": 100},
        "a.lora_A.weight": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
    }
    assert "__metadata__" in raise_message(write_raw(tmp_path / "m.safetensors", header, b"\x00" * 4))


@pytest.mark.parametrize(
    ("offsets", "data_len", "words"),
    [
        ([[0, 4], [2, 6]], 8, "overlaps"),
        ([[0, 4], [6, 10]], 10, "contiguous"),
        ([[4, 0], [4, 8]], 8, "run backwards"),
        ([[0, 4], [4, 8]], 9, "unexpected bytes after the last tensor"),
    ],
)
def test_bad_offsets(tmp_path: Path, offsets, data_len: int, words: str):
    header = {
        "a.lora_A.weight": {"dtype": "F16", "shape": [2], "data_offsets": offsets[0]},
        "a.lora_B.weight": {"dtype": "F16", "shape": [2], "data_offsets": offsets[1]},
    }
    path = write_raw(tmp_path / "o.safetensors", header, b"\x00" * data_len)
    assert words in raise_message(path)


def test_trailing_bytes_are_refused_like_the_loader_does(tmp_path: Path):
    path = write_kohya(tmp_path / "k.safetensors")
    with open(path, "ab") as f:
        f.write(b"\x00")
    with pytest.raises(SafetensorError):
        load_file(str(path))
    assert "unexpected bytes" in raise_message(path)


def test_shape_does_not_match_offsets(tmp_path: Path):
    header = {"a.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}
    message = raise_message(write_raw(tmp_path / "s.safetensors", header, b"\x00" * 8))
    assert "needs 16 bytes" in message and "span 8 bytes" in message


def test_no_lora_keys(tmp_path: Path):
    path = tmp_path / "plain.safetensors"
    save_file({"conv.weight": np.zeros((4, 4), np.float16)}, str(path))
    assert raise_message(path) == (
        "no LoRA weights found (expected lora_A/lora_B, lora_down/lora_up or lora.down/lora.up keys)"
    )


def test_valid_files_pass_the_gate_and_load(tmp_path: Path):
    path = write_kohya(tmp_path / "k.safetensors")
    info = read_lora_header(path, LIMIT)
    assert len(load_file(str(path))) == info.tensor_count


def test_modules_do_not_import_torch():
    code = "import sys, app.lora.safetensors_header, app.lora.registry; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    assert result.returncode == 0
