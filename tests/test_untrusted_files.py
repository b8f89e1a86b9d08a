"""Untrusted files in the LoRA folder: pickles and zips disguised as .safetensors, LoRAs for another model,
truncated, empty and integer files, legacy .ckpt/.bin/.pt files.

None of them is ever unpickled or applied; a request falls back to the base model with a warning that
names the problem (422 with "strict": true); the list and metadata endpoints show the file as invalid
with the reason; a bad file is not read again until it changes; other brands keep being served.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import struct
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from app.config import Settings
from app.lora import file_facts as file_facts_module
from app.lora.synthetic import random_lora_state_dict, target_layers, write_lora
from app.main import create_app

REQUEST = {"prompt": "a red coffee cup", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 5}


class _TouchOnLoad:
    """Unpickling this object creates `path`: the marker that proves code ran."""

    def __init__(self, path: Path):
        self.path = pathlib.PosixPath(path)

    def __reduce__(self):
        return (pathlib.PosixPath.touch, (self.path,))


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"lora_unet_x.lora_down.weight": _TouchOnLoad(marker)}, protocol=4)


def torch_zip_payload(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "hook": _TouchOnLoad(marker)}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("untrusted")
    app = create_app(Settings(lora_base_dir=work / "loras", data_dir=work / "data", log_level="warning"))
    with TestClient(app) as c:
        state = app.state.service_state
        assert state.wait_ready(120), state.load_error
        yield c, state, work


@pytest.fixture(scope="module")
def layers(setup):
    _, state, _ = setup
    return target_layers(state.engine.pipe.unet, state.engine.pipe.text_encoder)


@pytest.fixture(scope="module")
def good_bytes(setup, layers) -> bytes:
    _, _, work = setup
    return write_lora(work / "good.safetensors", random_lora_state_dict(layers, rank=2, seed=9)).read_bytes()


@pytest.fixture(scope="module")
def root(setup, layers) -> Path:
    _, state, _ = setup
    root = Path(state.registry.root)
    write_lora(root / "good" / "style.safetensors", random_lora_state_dict(layers, rank=2, seed=1))
    return root


def assert_good_brand_served(client: TestClient) -> None:
    r = client.post("/generate", json={**REQUEST, "brand_id": "good"})
    assert r.status_code == 200, r.text
    assert [lora["brand_id"] for lora in r.json()["loras"]] == ["good"]
    assert r.json()["warnings"] == []


def _sdxl_cross_attention(layers) -> dict:
    """PEFT keys for this model's cross-attention k/v, but 2048 wide as in SDXL."""
    state = {}
    for component, name, module in layers:
        if component == "unet" and name.endswith(("attn2.to_k", "attn2.to_v")):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(4, 2048)
            state[f"unet.{name}.lora_B.weight"] = torch.randn(module.weight.shape[0], 4)
    return state


def _kohya_missing_layers() -> dict:
    """kohya keys for UNet layers the tiny model does not have (a deeper SDXL-style block)."""
    state = {}
    for i in range(3):
        base = f"lora_unet_down_blocks_2_attentions_1_transformer_blocks_{i}_attn1_to_q"
        state[f"{base}.lora_down.weight"] = torch.randn(4, 64)
        state[f"{base}.lora_up.weight"] = torch.randn(64, 4)
        state[f"{base}.alpha"] = torch.tensor(4.0)
    return state


def _sdxl_second_text_encoder(layers) -> dict:
    """A kohya file whose UNet part fits, plus layers for SDXL's second text encoder (lora_te2_)."""
    state = {}
    for component, name, module in layers:
        if component == "unet" and name.endswith("attn1.to_q"):
            base = "lora_unet_" + name.replace(".", "_")
            state[f"{base}.lora_down.weight"] = torch.randn(4, module.weight.shape[1])
            state[f"{base}.lora_up.weight"] = torch.randn(module.weight.shape[0], 4)
            state[f"{base}.alpha"] = torch.tensor(4.0)
    base = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    state[f"{base}.lora_down.weight"] = torch.randn(4, 1280)
    state[f"{base}.lora_up.weight"] = torch.randn(1280, 4)
    state[f"{base}.alpha"] = torch.tensor(4.0)
    return state


def _nan_lora(layers) -> dict:
    state = random_lora_state_dict(layers, rank=2, seed=3)
    first_up = next(k for k in state if k.endswith("lora_B.weight"))
    state[first_up][0, 0] = float("nan")
    return state


def _integer_lora() -> dict:
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return {
        f"{base}.lora_down.weight": torch.ones(4, 32, dtype=torch.int32),
        f"{base}.lora_up.weight": torch.ones(32, 4, dtype=torch.int32),
    }


def _safetensors_bytes(state: dict, tmp: Path) -> bytes:
    save_file(state, str(tmp))
    return tmp.read_bytes()


# (brand, how to make the bytes, a word the reason must contain)
BAD_FILES = [
    ("pickled", lambda ctx: pickle_payload(ctx["marker"]), "pickle"),
    ("torchzip", lambda ctx: torch_zip_payload(ctx["marker"]), "pickle"),
    ("sdxl-xattn", lambda ctx: _safetensors_bytes(_sdxl_cross_attention(ctx["layers"]), ctx["tmp"]), "does not fit"),
    ("sdxl-layers", lambda ctx: _safetensors_bytes(_kohya_missing_layers(), ctx["tmp"]), "does not fit"),
    ("truncated", lambda ctx: ctx["good"][: len(ctx["good"]) // 2], "truncated"),
    ("header-only", lambda ctx: ctx["good"][: 8 + struct.unpack("<Q", ctx["good"][:8])[0]], "truncated"),
    ("empty", lambda ctx: b"", "empty"),
    ("integers", lambda ctx: _safetensors_bytes(_integer_lora(), ctx["tmp"]), "floating point"),
    ("sdxl-te2", lambda ctx: _safetensors_bytes(_sdxl_second_text_encoder(ctx["layers"]), ctx["tmp"]), "SDXL"),
    ("nan", lambda ctx: _safetensors_bytes(_nan_lora(ctx["layers"]), ctx["tmp"]), "NaN"),
    ("garbage", lambda ctx: os.urandom(4096), "not a safetensors file"),
]


@pytest.mark.parametrize(("brand", "make", "reason"), BAD_FILES, ids=[b for b, _, _ in BAD_FILES])
def test_bad_file_falls_back_with_a_warning_and_is_shown_invalid(
    setup, root, layers, good_bytes, tmp_path, brand, make, reason
):
    client, state, _ = setup
    marker = tmp_path / "code-ran"
    path = root / brand / "style.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(make({"marker": marker, "layers": layers, "good": good_bytes, "tmp": tmp_path / "t.st"}))
    loads_before = state.loras.loads

    r = client.post("/generate", json={**REQUEST, "brand_id": brand})
    assert r.status_code == 200, r.text
    assert r.json()["loras"] == []
    assert len(r.json()["warnings"]) == 1 and brand in r.json()["warnings"][0]
    assert reason in r.json()["warnings"][0], r.json()["warnings"]

    r = client.post("/generate", json={**REQUEST, "brand_id": brand, "strict": True})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "brand_id"] and reason in r.json()["detail"][0]["msg"]

    listed = {b["brand_id"]: b for b in client.get("/lora/list").json()["data"]}[brand]
    assert listed["valid"] is False and reason in listed["invalid_reason"], listed
    facts = client.get(f"/lora/{brand}/metadata").json()["file"]
    assert facts["valid"] is False and reason in facts["invalid_reason"], facts

    assert not marker.exists(), "unpickling code ran"
    assert state.loras.loads == loads_before
    assert brand not in state.loras.resident_adapters()
    assert_good_brand_served(client)


def test_the_pickle_payloads_are_live(tmp_path):
    """The payloads above would create the marker if anything unpickled them (so their absence means something)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle_payload(marker))
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(torch_zip_payload(marker)), weights_only=False)
    assert marker.exists()


def test_bad_file_is_not_read_again_until_it_changes_then_the_fix_is_applied(
    setup, root, good_bytes, monkeypatch, tmp_path
):
    client, state, _ = setup
    path = root / "fixme" / "style.safetensors"
    path.parent.mkdir()
    path.write_bytes(good_bytes[:100])
    reads = []
    real_read = file_facts_module.read_lora_header
    monkeypatch.setattr(file_facts_module, "read_lora_header", lambda *a: reads.append(a) or real_read(*a))

    first = client.post("/generate", json={**REQUEST, "brand_id": "fixme"})
    assert first.status_code == 200 and first.json()["loras"] == []
    assert len(reads) == 1
    again = client.post("/generate", json={**REQUEST, "brand_id": "fixme"})
    assert again.json()["warnings"] == first.json()["warnings"]
    assert len(reads) == 1, "the known-bad file was read again although it did not change"

    # Replaced the way an upload tool does it: a new file renamed over the old one.
    staged = tmp_path / "style.safetensors"
    staged.write_bytes(good_bytes)
    os.replace(staged, path)
    fixed = client.post("/generate", json={**REQUEST, "brand_id": "fixme"})
    assert fixed.status_code == 200, fixed.text
    assert [lora["brand_id"] for lora in fixed.json()["loras"]] == ["fixme"]
    assert fixed.json()["warnings"] == []
    assert len(reads) == 2
    assert fixed.json()["image"] != first.json()["image"]
    listed = {b["brand_id"]: b for b in client.get("/lora/list").json()["data"]}["fixme"]
    assert listed["valid"] is True and listed["invalid_reason"] is None
    assert client.get("/lora/fixme/metadata").json()["file"]["valid"] is True


def test_pickle_formats_are_listed_as_unsupported_and_never_loaded(setup, root, tmp_path):
    client, state, _ = setup
    marker = tmp_path / "code-ran"
    folder = root / "legacy"
    folder.mkdir()
    for name in ("style.ckpt", "lora.bin", "model.pt", "weights.pth"):
        (folder / name).write_bytes(pickle_payload(marker))
    (folder / "v2").mkdir()
    (folder / "v2" / "style.ckpt").write_bytes(torch_zip_payload(marker))

    listed = {b["brand_id"]: b for b in client.get("/lora/list").json()["data"]}["legacy"]
    assert listed["unsupported_files"] == ["lora.bin", "model.pt", "style.ckpt", "v2/style.ckpt", "weights.pth"]
    assert listed["valid"] is False and "safetensors" in listed["invalid_reason"]

    r = client.post("/generate", json={**REQUEST, "brand_id": "legacy"})
    assert r.status_code == 200 and r.json()["loras"] == []
    assert "LoRA not found for brand_id: legacy" in r.json()["warnings"][0]
    r = client.post("/generate", json={**REQUEST, "brand_id": "legacy", "strict": True})
    assert r.status_code == 422 and "legacy" in r.json()["detail"][0]["msg"]
    assert client.get("/lora/legacy/metadata").status_code == 404
    assert not marker.exists()
    assert_good_brand_served(client)


def test_a_bad_file_next_to_good_ones_spoils_only_itself(setup, root):
    """A request naming a good and a bad brand gets the good one applied and a warning for the bad one."""
    client, _, _ = setup
    (root / "broken").mkdir()
    (root / "broken" / "style.safetensors").write_bytes(b"\x80\x04not really")
    body = {**REQUEST, "lora_configs": [{"brand_id": "good", "weight": 0.6}, {"brand_id": "broken", "weight": 0.6}]}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert [lora["brand_id"] for lora in r.json()["loras"]] == ["good"]
    assert len(r.json()["warnings"]) == 1 and "broken" in r.json()["warnings"][0]
    assert client.post("/generate", json={**body, "strict": True}).status_code == 422
    assert_good_brand_served(client)
