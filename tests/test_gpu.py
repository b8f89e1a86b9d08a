"""The CUDA path (float16, one pipeline on the GPU): accuracy against diffusers, exact base restore,
batched images. Skipped where there is no CUDA device (CI and the developers' machines); run on a
lent GPU with `pytest -m gpu tests/test_gpu.py` (bench/gpu.sh does).

Bounds are derived as on the CPU: our float16 image must be as close to a float32 result as
diffusers' own float16 image is (float16 merged weights and diffusers' unfused float16 LoRA layers
round differently, by an amount no fixed number captures on every GPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import FLOAT32_ERROR_RATIO, reference_image, spec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SEED = 5
NO_CFG = 1.0


@pytest.fixture(scope="module")
def cuda_engine(model_cache_dir, tmp_path_factory):
    from app.engine.diffusion import DiffusionEngine
    from tests.conftest import test_settings

    settings = test_settings(model_cache_dir, tmp_path_factory.mktemp("gpu-loras"), device="cuda", dtype="auto")
    engine = DiffusionEngine(settings)
    assert engine.dtype == torch.float16
    return engine


def _cuda_reference(model_dir, dtype, lora=None, weight=0.8):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="a")
        pipe.set_adapters(["a"], [weight])
    return reference_image(pipe, seed=SEED, guidance=NO_CFG)


def _image(engine, adapters=()):
    from app.jobs import GenerationJob

    return engine.generate(GenerationJob(spec(seed=SEED, guidance=NO_CFG), tuple(adapters)), output_type="np").image


def test_float16_lora_is_as_accurate_as_diffusers_and_the_base_comes_back(cuda_engine, model_dir, make_lora, tmp_path):
    from app.jobs import ActiveAdapter

    path = make_lora(tmp_path / "a.safetensors", key_format="kohya", convolutions=True, alpha=2.0, strength=0.5)
    base = _image(cuda_engine)
    assert np.isfinite(base).all(), "the embedded model's float16 base image has NaN/inf (an overflow, no LoRA yet)"
    unet_before = {k: v.clone() for k, v in cuda_engine.pipe.unet.state_dict().items()}
    ours = _image(cuda_engine, [ActiveAdapter("a", cuda_engine.load_adapter(path), 0.8)])
    back = _image(cuda_engine)

    theirs = _cuda_reference(model_dir, torch.float16, path)
    exact = _cuda_reference(model_dir, torch.float32, path)
    ours_error, their_error = float(np.abs(ours - exact).max()), float(np.abs(theirs - exact).max())
    assert np.abs(ours - base).max() > 0.01, "the LoRA should visibly change the image"
    assert ours_error <= FLOAT32_ERROR_RATIO * max(their_error, float(np.spacing(np.float16(0.5)))), (
        f"max error vs float32: ours {ours_error:.3g}, diffusers' float16 {their_error:.3g}"
    )
    # The weights come back bit for bit; so does the image where the GPU's kernels are deterministic.
    unet_after = cuda_engine.pipe.unet.state_dict()
    assert all(torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    if np.array_equal(_image(cuda_engine), base):
        np.testing.assert_array_equal(back, base)


def test_a_batch_on_the_gpu_is_as_accurate_as_its_single_images(cuda_engine, model_cache_dir, make_lora, tmp_path):
    """Batched float16 kernels tile differently: a batched image must be no further from the float32
    image than the single float16 image is (x FLOAT32_ERROR_RATIO)."""
    from app.engine.diffusion import DiffusionEngine
    from app.jobs import ActiveAdapter, GenerationJob
    from tests.conftest import test_settings

    exact_engine = DiffusionEngine(test_settings(model_cache_dir, tmp_path, device="cuda", dtype="float32"))
    paths = [make_lora(tmp_path / f"{n}.safetensors", seed=s, strength=0.5) for n, s in (("a", 3), ("b", 4))]
    for sets in ([("a", 0.8)] * 3, [("a", 0.8), ("b", 0.6), None]):
        def jobs(engine, sets=sets):
            loaded = {n: engine.load_adapter(p) for n, p in zip("ab", paths, strict=True)}
            adapters = [() if x is None else (ActiveAdapter(x[0], loaded[x[0]], x[1]),) for x in sets]
            return [GenerationJob(spec(seed=10 + i), lora) for i, lora in enumerate(adapters)]

        singles = [cuda_engine.generate(j, output_type="np").image for j in jobs(cuda_engine)]
        batched = cuda_engine.generate_batch(jobs(cuda_engine), output_type="np")
        exact = [exact_engine.generate(j, output_type="np").image for j in jobs(exact_engine)]
        for single, result, reference in zip(singles, batched, exact, strict=True):
            single_error = float(np.abs(single - reference).max())
            assert np.abs(result.image - reference).max() <= FLOAT32_ERROR_RATIO * max(single_error, 1 / 255)
