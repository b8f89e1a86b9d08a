"""Shared fixtures: the embedded model, a real engine, diffusers' own pipeline, LoRA files, app clients.

Everything runs on the CPU at 64x64 with 2 denoising steps. The expensive pieces (the model folder,
the engine, the diffusers reference pipeline) are built once per session and reused; tests that need
exact cache counters build their own app (about 2 s each).
"""

# ruff: noqa: E402  (OMP_NUM_THREADS must be set before torch is imported)
from __future__ import annotations

import os

# One intra-op thread, set before torch is imported (and inherited by the server subprocess): these
# models are tiny, and on a busy 2-core machine two OpenMP threads per process spend most of their
# time waiting for each other (measured: 0.4 s vs 4 s per image). Override with OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import base64
import hashlib
import io
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.config import Settings
from app.engine.embedded import UNET_CONFIG, embedded_model_path
from app.lora.synthetic import random_lora_state_dict, target_layers, write_lora

# The smallest request the API accepts; fast on two CPU cores.
SIZE = 64
STEPS = 2
PROMPT = "a red coffee cup on a wooden table"
GUIDANCE = 7.5
READY_TIMEOUT_S = 120


def small_request(**fields) -> dict:
    """A /generate body at the test size; fields override or add."""
    return {"prompt": PROMPT, "width": SIZE, "height": SIZE, "num_inference_steps": STEPS, "seed": 7, **fields}


def decode_png(image_b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(image_b64)))
    image.load()
    return image


def png_bytes(image_b64: str) -> bytes:
    return base64.b64decode(image_b64)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- the model -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """The project's model cache (`.cache/models`): the embedded model is built there once and reused.

    Building takes several seconds; the folder name carries EMBEDDED_MODEL_VERSION and is written
    atomically, so reusing it across runs is safe.
    """
    return Path(Settings.model_fields["model_cache_dir"].default)


@pytest.fixture(scope="session")
def model_dir(model_cache_dir: Path) -> Path:
    return embedded_model_path(model_cache_dir)


def test_settings(model_cache_dir: Path, lora_dir: Path, **overrides) -> Settings:
    fields = dict(device="cpu", dtype="float32", log_level="warning", lora_preload_brands="")
    return Settings(model_cache_dir=model_cache_dir, lora_base_dir=lora_dir, **{**fields, **overrides})


test_settings.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def engine(model_cache_dir: Path, model_dir: Path, tmp_path_factory):
    """One real DiffusionEngine for the session. Tests pass their adapters to each generate call."""
    from app.engine.pipeline import DiffusionEngine

    return DiffusionEngine(test_settings(model_cache_dir, tmp_path_factory.mktemp("engine-loras")))


def load_reference_pipe(model_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def reference_pipe(model_dir: Path):
    """diffusers' own StableDiffusionPipeline on the same folder, never given a LoRA (for base comparisons)."""
    return load_reference_pipe(model_dir)


@pytest.fixture
def reference(model_dir: Path):
    """A fresh diffusers pipeline a test may load LoRAs into (under a second to load).

    Fresh rather than unloaded after each test: unfusing in float32 does not give the base weights
    back bit for bit, and a reference must never carry another test's state.
    """
    return load_reference_pipe(model_dir)


def reference_image(
    pipe, seed: int, output_type: str = "np", prompt: str = PROMPT, size: int = SIZE, guidance: float = GUIDANCE
):
    with torch.inference_mode():
        return pipe(
            prompt=prompt,
            width=size,
            height=size,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type=output_type,
        ).images[0]


def spec(seed: int = 7, prompt: str = PROMPT, size: int = SIZE, guidance: float = GUIDANCE):
    from app.engine.pipeline import GenerationSpec

    return GenerationSpec(
        prompt=prompt,
        negative_prompt=None,
        width=size,
        height=size,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        seed=seed,
    )


# ---- LoRA files ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def base_modules(model_dir: Path):
    """Pristine UNet and text encoder (never merged into) whose shapes and scales the LoRA files follow."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(str(model_dir), subfolder="text_encoder")
    return unet, text_encoder


LoraFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_lora(base_modules) -> LoraFactory:
    """Write a real LoRA file for the embedded model; same arguments -> same bytes.

    key_format "peft" or "kohya"; text_encoder adds CLIP attention layers; convolutions adds the
    UNet resnet 3x3 convs; alpha (kohya) differs from the rank to exercise the scale.
    """
    unet, text_encoder = base_modules

    def write(
        path: Path,
        key_format: str = "peft",
        text_encoder_layers: bool = True,
        convolutions: bool = False,
        rank: int = 4,
        alpha: float | None = None,
        seed: int = 0,
        strength: float = 2.0,
    ) -> Path:
        layers = target_layers(
            unet, text_encoder, feed_forward=True, convolutions=convolutions, with_text_encoder=text_encoder_layers
        )
        state = random_lora_state_dict(
            layers, rank=rank, alpha=alpha, key_format=key_format, seed=seed, strength=strength
        )
        return write_lora(Path(path), state)

    return write


@pytest.fixture(scope="session")
def make_brand(make_lora) -> Callable[..., Path]:
    """Write `<root>/<brand>/style.safetensors` (or `<root>/<brand>/<version>/...`); returns the file."""

    def write(root: Path, brand: str, version: str | None = None, **lora_args) -> Path:
        folder = Path(root) / brand / (version or "")
        return make_lora(folder / "style.safetensors", **lora_args)

    return write


@pytest.fixture(scope="session")
def make_foreign_lora(tmp_path_factory) -> LoraFactory:
    """Write a LoRA made for a wider UNet with SDXL's 2048-wide cross-attention: it cannot fit."""
    from diffusers import UNet2DConditionModel

    config = {**UNET_CONFIG, "cross_attention_dim": 2048, "block_out_channels": (64, 128, 128, 128)}
    torch.manual_seed(0)
    wide_unet = UNet2DConditionModel(**config)

    def write(path: Path, key_format: str = "peft") -> Path:
        layers = target_layers(wide_unet, None, with_text_encoder=False)
        return write_lora(Path(path), random_lora_state_dict(layers, rank=4, key_format=key_format, seed=5))

    return write


# ---- expected images -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def expected_png(engine) -> Callable[..., bytes]:
    """The PNG the service must return for (LoRA file or None, weight, seed), rendered by the session engine.

    Results are memoised by the file's sha256, so files with the same bytes share one rendering.
    """
    from app.engine.pipeline import ActiveAdapter
    from app.service import encode_png

    rendered: dict[tuple, bytes] = {}

    def render(lora_path: Path | None = None, weight: float = 0.8, seed: int = 7) -> bytes:
        digest = sha256_of(lora_path) if lora_path is not None else None
        key = (digest, weight if digest else None, seed)
        if key not in rendered:
            adapters = []
            if lora_path is not None:
                name = f"expected-{digest[:16]}"
                adapters = [ActiveAdapter(name, engine.load_adapter(name, Path(lora_path)), weight)]
            rendered[key] = encode_png(engine.generate(spec(seed), adapters).image)
        return rendered[key]

    return render


# ---- the app -------------------------------------------------------------------------------------


@pytest.fixture
def lora_root(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def make_client(model_cache_dir: Path, model_dir: Path) -> Callable[..., AbstractContextManager]:
    """`with make_client(lora_dir, **settings) as c:` a TestClient whose lifespan ran and whose model is ready."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    @contextmanager
    def client(lora_dir: Path, **overrides) -> Iterator[TestClient]:
        app = create_app(test_settings(model_cache_dir, lora_dir, **overrides))
        with TestClient(app) as c:
            state = app.state.service_state
            assert state.wait_ready(READY_TIMEOUT_S), f"the app did not become ready: {state.load_error}"
            yield c

    return client


@pytest.fixture
def client(make_client, lora_root: Path):
    with make_client(lora_root) as c:
        yield c
