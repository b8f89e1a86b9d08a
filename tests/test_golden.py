"""Golden images: the sha256 of the pixels of a handful of PNGs (base, one LoRA, three composed, an A/B
grid and its contact sheet), recorded before a refactor that must not change a single bit. Pixels, not
file bytes: the PNG's text chunk (the settings, as infotext) is metadata, not the image.

Float results depend on the CPU's kernels and the library versions, so hashes are kept per machine
fingerprint. Where this machine has none recorded, the test is skipped and says how to record them:
`RECORD_GOLDEN=1 pytest tests/test_golden.py` on the code before the change, then run it after.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
from pathlib import Path

import pytest
from PIL import Image

from app.demo import write_demo_loras
from tests.conftest import png_bytes, small_request

GOLDEN_FILE = Path(__file__).parent / "golden" / "images.json"
RECORD = os.environ.get("RECORD_GOLDEN") == "1"


def machine_fingerprint() -> str:
    import diffusers
    import torch
    import transformers

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return " | ".join(
        [cpu, platform.machine(), torch.backends.cpu.get_cpu_capability(), f"torch {torch.__version__}",
         f"diffusers {diffusers.__version__}", f"transformers {transformers.__version__}"]
    )  # fmt: skip


def sha(png: bytes) -> str:
    """sha256 of the decoded pixels (mode and size included)."""
    image = Image.open(io.BytesIO(png))
    return hashlib.sha256(f"{image.mode} {image.size}".encode() + image.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def golden_client(make_client, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("golden-loras")
    write_demo_loras(lora_dir)  # seeded: the same files on every run
    with make_client(lora_dir, data_dir=tmp_path_factory.mktemp("golden-data")) as client:
        yield client


def render_all(client) -> dict[str, str]:
    def generate(**fields) -> str:
        response = client.post("/generate", json=small_request(seed=21, **fields))
        assert response.status_code == 200, response.text
        return sha(png_bytes(response.json()["image"]))

    hashes = {
        "base": generate(),
        "one-lora": generate(brand_id="acme", lora_weights=0.8),
        "three-composed": generate(
            lora_configs=[
                {"brand_id": "acme", "weight": 0.7},
                {"brand_id": "globex", "version": "v1", "weight": 0.5},
                {"brand_id": "studio-light", "weight": 0.4},
            ]
        ),
    }
    ab = client.post(
        "/ab-test",
        json={**small_request(seed=21), "grid": [{"brand_id": "acme", "weights": [0.2, 0.8]},
                                                 {"brand_id": "globex", "weights": [0.0, 0.5]}]},
    )  # fmt: skip
    assert ab.status_code == 200, ab.text
    for variant in ab.json()["variants"]:
        hashes[f"ab-grid-{variant['index']}"] = sha(png_bytes(variant["image"]))
    hashes["ab-contact-sheet"] = sha(png_bytes(ab.json()["contact_sheet"]))
    return hashes


def test_images_are_bit_identical_to_the_recorded_ones(golden_client):
    fingerprint = machine_fingerprint()
    recorded = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {}
    if fingerprint not in recorded and not RECORD:
        pytest.skip(f"no golden images for this machine ({fingerprint}); record them with RECORD_GOLDEN=1")

    hashes = render_all(golden_client)

    if RECORD:
        recorded[fingerprint] = hashes
        GOLDEN_FILE.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    assert hashes == recorded[fingerprint]
