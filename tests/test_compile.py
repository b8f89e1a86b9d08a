"""COMPILE_UNET: the compiled UNet gives the same images, and a LoRA switch never recompiles (merged
weights are written into the parameters' own storage). Compiled on the CPU here (inductor's C++
backend); the first compile takes about a minute, later runs reuse the cache in the model folder.
"""

from __future__ import annotations

import numpy as np
import pytest

from app.jobs import ActiveAdapter, GenerationJob
from tests.conftest import FLOAT32_ERROR_RATIO, FLOAT32_STEP, SIZE, spec, test_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled_engine(model_cache_dir, model_dir, tmp_path_factory):
    from app.engine.diffusion import DiffusionEngine

    settings = test_settings(
        model_cache_dir, tmp_path_factory.mktemp("compile-loras"), compile_unet=True, compile_warmup_size=SIZE
    )
    return DiffusionEngine(settings)


def test_lora_switches_do_not_recompile_and_the_images_stay_right(compiled_engine, engine, make_lora, tmp_path):
    eager = engine
    engine = compiled_engine
    graphs_after_warm_up = engine.compile_stats()["graphs"]
    a = make_lora(tmp_path / "a.safetensors", seed=91)
    b = make_lora(tmp_path / "b.safetensors", key_format="kohya", convolutions=True, seed=92)
    wa, wb = engine.load_adapter(a), engine.load_adapter(b)

    def image(*adapters, on=None):
        return (on or engine).generate(GenerationJob(spec(seed=4), adapters), output_type="np").image

    base = image()
    with_a = image(ActiveAdapter("a", wa, 0.8))
    with_b = image(ActiveAdapter("b", wb, 0.6))
    both = image(ActiveAdapter("a", wa, 0.5), ActiveAdapter("b", wb, 0.5))
    base_again = image()

    assert engine.compile_stats()["graphs"] == graphs_after_warm_up  # four switches, no new graph
    assert engine.compile_stats()["compile_seconds"] > 0
    np.testing.assert_array_equal(base_again, base)
    assert np.abs(with_a - base).max() > 0.02 and np.abs(with_b - with_a).max() > 0.02
    # Compiled kernels round differently from eager ones (fused, reordered): the base image shows by how
    # much. A merged LoRA must add nothing of its own beyond that (same ratio as against diffusers).
    compile_error = float(np.abs(base - image(on=eager)).max())
    ea, eb = eager.load_adapter(a), eager.load_adapter(b)
    for compiled, eager_image in [
        (with_a, image(ActiveAdapter("a", ea, 0.8), on=eager)),
        (both, image(ActiveAdapter("a", ea, 0.5), ActiveAdapter("b", eb, 0.5), on=eager)),
    ]:
        assert np.abs(compiled - eager_image).max() <= FLOAT32_ERROR_RATIO * max(compile_error, FLOAT32_STEP)
