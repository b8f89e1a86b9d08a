"""The CUDA path (float16, one pipeline on the GPU): equality with diffusers and exact base restore.

Skipped where there is no CUDA device (CI and the developers' machines); run on a lent GPU with
`pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import reference_image, render, spec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def cuda_engine(model_cache_dir):
    from app.config import Settings
    from app.engine.diffusion import DiffusionEngine

    engine = DiffusionEngine(Settings(model_cache_dir=model_cache_dir, device="cuda", dtype="auto"))
    assert engine.dtype == torch.float16
    return engine


def _cuda_reference(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), dtype=torch.float16, safety_checker=None, requires_safety_checker=False
    ).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_float16_lora_matches_diffusers_and_the_base_comes_back(cuda_engine, model_dir, make_lora, tmp_path):
    from app.jobs import ActiveAdapter

    path = make_lora(tmp_path / "a.safetensors", key_format="kohya", convolutions=True, alpha=2.0, strength=0.5)
    base = render(cuda_engine, spec(seed=5, guidance=1.0))
    weights = cuda_engine.load_adapter(path)
    ours = render(cuda_engine, spec(seed=5, guidance=1.0), [ActiveAdapter("a", weights, 0.8)])

    reference = _cuda_reference(model_dir)
    reference.load_lora_weights(str(path), adapter_name="a")
    reference.set_adapters(["a"], [0.8])
    theirs = reference_image(reference, seed=5, guidance=1.0)

    assert np.abs(ours - base).max() > 0.01  # the LoRA visibly changed the image
    assert np.abs(ours - theirs).max() <= 4e-3  # the fp16 tolerance
    back = render(cuda_engine, spec(seed=5, guidance=1.0))
    assert np.array_equal(back, base)
