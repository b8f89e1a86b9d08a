"""The engine against diffusers itself: base images, merged LoRAs vs. diffusers' PEFT LoRAs, restoring the base."""

from __future__ import annotations

import os

import numpy as np
import pytest

from app.engine.lora_weights import LoraIncompatibleError
from app.jobs import ActiveAdapter
from app.lora.registry import fingerprint_of
from tests.conftest import (
    GUIDANCE,
    assert_as_accurate_as_diffusers,
    reference_image,
    render,
    sha256_of,
    spec,
    with_lora_b_biases,
)

SEED = 11
# The synthetic LoRAs change the image a lot; a comparison is only meaningful if the LoRA shows.
VISIBLE_CHANGE = 0.02


@pytest.fixture(scope="module")
def base_image(engine) -> np.ndarray:
    return render(engine, spec(SEED))


def generate(engine, adapters=()) -> np.ndarray:
    return render(engine, spec(SEED), adapters)


def test_base_image_equals_diffusers_own_call(engine, reference_pipe, base_image):
    expected = reference_image(reference_pipe, SEED)

    # The same pipeline code on the same weights in the same process: the same arithmetic, the same bits.
    assert base_image.shape == (64, 64, 3)
    np.testing.assert_array_equal(base_image, expected)


# LoRA images are compared, with classifier-free guidance off and on, by their distance to diffusers'
# float64 result (see assert_as_accurate_as_diffusers): two correct float32 implementations (diffusers'
# unfused PEFT forward, base(x) + B(A(x)), and a merged weight) round differently, CFG at 7.5 multiplies
# that noise at every step, and which one lands closer depends on the CPU's kernels.
NO_CFG = 1.0
LORA_CASES = {
    "peft-unet-and-text-encoder": dict(key_format="peft", text_encoder_layers=True, convolutions=False, weight=0.8),
    "kohya-unet-text-encoder-convs": dict(
        key_format="kohya", text_encoder_layers=True, convolutions=True, alpha=2.0, weight=0.6
    ),
    "peft-unet-text-encoder-convs": dict(key_format="peft", text_encoder_layers=True, convolutions=True, weight=0.8),
}


@pytest.fixture(scope="module")
def base_image_no_cfg(engine) -> np.ndarray:
    return render(engine, spec(SEED, guidance=NO_CFG))


@pytest.mark.parametrize("case", LORA_CASES.values(), ids=LORA_CASES.keys())
def test_lora_equals_diffusers_load_lora_weights(engine, model_dir, make_lora, tmp_path, base_image_no_cfg, case):
    case = dict(case)
    weight = case.pop("weight")
    path = make_lora(tmp_path / "brand.safetensors", seed=3, **case)

    adapter = ActiveAdapter("brand", engine.load_adapter(path), weight)
    merged = render(engine, spec(SEED, guidance=NO_CFG), [adapter])

    assert np.abs(merged - base_image_no_cfg).max() > VISIBLE_CHANGE, "the LoRA should visibly change the image"
    assert_as_accurate_as_diffusers(merged, model_dir, [(path, weight)], SEED, NO_CFG)


def test_two_loras_equal_diffusers_set_adapters_in_any_order(engine, model_dir, make_lora, tmp_path):
    a = make_lora(tmp_path / "a.safetensors", key_format="peft", seed=21)
    b = make_lora(tmp_path / "b.safetensors", key_format="kohya", seed=22, text_encoder_layers=False)
    wa, wb = engine.load_adapter(a), engine.load_adapter(b)

    ab = render(engine, spec(SEED, guidance=NO_CFG), [ActiveAdapter("a", wa, 0.7), ActiveAdapter("b", wb, 0.4)])
    ba = render(engine, spec(SEED, guidance=NO_CFG), [ActiveAdapter("b", wb, 0.4), ActiveAdapter("a", wa, 0.7)])

    np.testing.assert_array_equal(ab, ba)
    assert_as_accurate_as_diffusers(ab, model_dir, [(a, 0.7), (b, 0.4)], SEED, NO_CFG)


def test_strong_conv_lora_with_guidance_is_as_accurate_as_diffusers(engine, model_dir, make_lora, tmp_path, base_image):
    path = make_lora(tmp_path / "strong.safetensors", key_format="kohya", convolutions=True, seed=9, strength=2.0)

    merged = generate(engine, [ActiveAdapter("strong", engine.load_adapter(path), 1.0)])

    assert np.abs(merged - base_image).max() > VISIBLE_CHANGE
    assert_as_accurate_as_diffusers(merged, model_dir, [(path, 1.0)], SEED, GUIDANCE)


def test_weight_zero_gives_the_base_image_bit_exact(engine, make_lora, tmp_path, base_image):
    path = make_lora(tmp_path / "brand.safetensors", seed=4)

    image = generate(engine, [ActiveAdapter("zero", engine.load_adapter(path), 0.0)])

    np.testing.assert_array_equal(image, base_image)


def test_base_image_comes_back_bit_exact_after_a_lora(engine, make_lora, tmp_path, base_image):
    path = make_lora(tmp_path / "brand.safetensors", key_format="kohya", convolutions=True, seed=5)
    with_lora = generate(engine, [ActiveAdapter("after", engine.load_adapter(path), 1.0)])

    after = generate(engine)

    assert np.abs(with_lora - base_image).max() > VISIBLE_CHANGE
    np.testing.assert_array_equal(after, base_image)


def test_restore_base_after_a_merge_gives_the_base_weights_back(engine, make_lora, tmp_path, base_modules):
    import torch

    path = make_lora(tmp_path / "brand.safetensors", convolutions=True, seed=6)
    generate(engine, [ActiveAdapter("restore", engine.load_adapter(path), 1.0)])
    module = engine.pipe.unet.down_blocks[0].resnets[0].conv1
    pristine = base_modules[0].down_blocks[0].resnets[0].conv1.weight
    assert not torch.equal(module.weight, pristine), "the LoRA should have been merged into this conv"

    engine.restore_base()

    assert torch.equal(module.weight, pristine)


@pytest.mark.parametrize("key_format", ["peft", "kohya"])
def test_lora_for_another_architecture_is_refused_with_the_reason(engine, make_foreign_lora, tmp_path, key_format):
    path = make_foreign_lora(tmp_path / "sdxl-like.safetensors", key_format=key_format)

    with pytest.raises(LoraIncompatibleError, match="does not fit") as excinfo:
        engine.load_adapter(path)

    assert "wrong shape" in str(excinfo.value)


def test_a_lora_b_bias_on_a_layer_without_bias_is_refused_with_the_reason(engine, make_lora, tmp_path):
    # PEFT's lora_bias=True puts a bias on every lora_B, also on SD 1.5's bias-less attention projections.
    path = with_lora_b_biases(make_lora(tmp_path / "biased.safetensors"), engine._targets, False)

    with pytest.raises(LoraIncompatibleError, match="has a lora_B bias, but the model's layer has no bias"):
        engine.load_adapter(path)


def test_a_known_digest_is_used_only_for_the_file_version_it_was_taken_of(engine, make_lora, tmp_path):
    path = make_lora(tmp_path / "known.safetensors", seed=31)
    version = fingerprint_of(os.stat(path))
    rewritten = (version[0], version[1] - 1, version[2])  # same size and inode, another modification time
    stale = "0" * 64

    trusted = engine.read_adapter(path, known_sha256=(version, stale))
    other = engine.read_adapter(path, known_sha256=(rewritten, stale))

    assert trusted.sha256 == stale  # that version's digest, taken without hashing the bytes again
    assert other.sha256 == sha256_of(path) and other.fingerprint == version
