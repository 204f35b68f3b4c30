"""Reduced-precision and batched feature extraction: the numbers they give against float32, one image at a time."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ddpm_seg import backbones
from ddpm_seg.backbones import (create_feature_extractor, extract_batch_size, extract_dtype, image_tensor)
from ddpm_seg.backbones import shared_noise
from ddpm_seg.backbones.ddpm import DDPMFeatureExtractor
from ddpm_seg.backbones.mae import MAEFeatureExtractor, create_mae_encoder
from ddpm_seg.backbones.swav import SwAVFeatureExtractor, SwAVResNet50
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16", num_head_channels=16,
            learn_sigma=True, diffusion_steps=100)
STEPS, BLOCKS = [5, 40], [1, 3, 5]
# Relative error ||ours - fp32|| / ||fp32|| per map allowed for each dtype. bf16 keeps 8 significant bits
# (rounding 2^-9 = 0.2% per operation), fp16 11 bits (0.025%); a few layers of rounding compound. Measured on
# the tiny UNet below: bf16 0.36-0.48% per map, fp16 0.045-0.058%.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _ddpm(dtype=torch.float32, share_noise=True):
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY})
    model.eval().convert_body(dtype)
    noise = shared_noise(0, 1, (3, 32, 32), "cpu") if share_noise else None
    return DDPMFeatureExtractor(model, diffusion, STEPS, BLOCKS, noise=noise)


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def relative_error(ours, reference):
    return float((ours.double() - reference.double()).norm() / reference.double().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_features_stay_near_float32(dtype):
    image = _images(1)[0]
    reference = _ddpm()(image)
    ours = _ddpm(dtype)(image)
    errors = [relative_error(o, r) for o, r in zip(ours, reference)]
    assert all(o.dtype == torch.float32 and o.shape == r.shape for o, r in zip(ours, reference))
    assert max(errors) < TOLERANCE[dtype], errors
    # Really computed in the lower precision: not bit-equal to float32.
    assert min(errors) > 0


def test_float32_body_is_exactly_the_unconverted_model():
    image = _images(1)[0]
    extractor = _ddpm()
    extractor.model.convert_body(torch.bfloat16)
    extractor.model.convert_body(torch.float32)  # bf16 rounding of the weights is not undone...
    assert extractor.model.dtype == torch.float32
    # ...so build the float32 one directly: fp32 is the model as loaded, bit for bit.
    a, b = _ddpm(torch.float32)(image), _ddpm()(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("share_noise", [True, False])
def test_batched_ddpm_extraction_equals_one_image_at_a_time(share_noise):
    images = _images(3)
    extractor = _ddpm(share_noise=share_noise)
    torch.manual_seed(123)  # without share_noise each image draws its noise from the global generator
    singles = [extractor(image) for image in images]
    torch.manual_seed(123)
    batched = extractor(images)
    assert len(batched) == len(STEPS) * len(BLOCKS)
    for k, maps in enumerate(batched):
        assert maps.shape == (3, *singles[0][k].shape)
        for i in range(3):
            assert relative_error(maps[i], singles[i][k]) <= 1e-5
    # The images really differ, so the comparison above is not trivially true.
    assert relative_error(batched[0][0], batched[0][1]) > 0.01


def test_batched_swav_and_mae_equal_one_image_at_a_time():
    images = _images(2, size=64)
    torch.manual_seed(0)
    swav = SwAVFeatureExtractor(SwAVResNet50(widen=1, width=8).eval())
    torch.manual_seed(0)
    mae = MAEFeatureExtractor(create_mae_encoder(64, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                                                 mlp_ratio=2.0).eval(), num_blocks=2)
    for extractor in (swav, mae):
        singles = [extractor(image) for image in images]
        batched = extractor(images)
        for k, maps in enumerate(batched):
            for i in range(2):
                assert relative_error(maps[i], singles[i][k]) <= 1e-5


@pytest.mark.parametrize("model_type", ["swav", "mae"])
def test_every_backbone_runs_in_bf16(model_type, monkeypatch):
    from ddpm_seg.backbones import mae, swav
    monkeypatch.setitem(swav.ARCHITECTURES, "swav", dict(widen=1, width=8))
    monkeypatch.setattr(mae, "ARCHITECTURE", dict(patch_size=8, embed_dim=32, depth=14, num_heads=2, mlp_ratio=2.0))
    cfg = SimpleNamespace(model_type=model_type, dim=[64, 64, 0], input_activations=False, model_path=None)
    image = _images(1, size=64)[0]
    reference = create_feature_extractor(cfg, {}, torch.device("cpu"), random_init=True)(image)
    ours = create_feature_extractor(cfg, {}, torch.device("cpu"), random_init=True, dtype="bf16")(image)
    errors = [relative_error(o, r) for o, r in zip(ours, reference)]
    assert all(o.dtype == torch.float32 for o in ours)
    assert 0 < max(errors) < TOLERANCE[torch.bfloat16], errors


def test_auto_dtype_follows_the_cpu_and_use_fp16(monkeypatch):
    monkeypatch.setattr(backbones, "cpu_has_native_bf16", lambda: True)
    assert extract_dtype("auto", "cpu") == torch.bfloat16
    assert extract_dtype("auto", "cpu", use_fp16=True) == torch.bfloat16  # fp16 convolutions are slow on CPUs
    monkeypatch.setattr(backbones, "cpu_has_native_bf16", lambda: False)
    assert extract_dtype("auto", "cpu") == torch.float32
    assert extract_dtype("auto", "cuda", use_fp16=True) == torch.float16
    assert extract_dtype("auto", "cuda") == torch.float32
    assert extract_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="--extract_dtype"):
        extract_dtype("int8", "cpu")


def test_default_extract_batch_fits_a_share_of_free_memory(monkeypatch):
    monkeypatch.setattr(backbones, "available_memory_bytes", lambda device: 16 * 2**30)
    assert extract_batch_size(None, 2 * 2**30, "cuda") == 2  # a quarter of 16 GiB holds two 2 GiB images
    assert extract_batch_size(None, 2**20, "cuda") == backbones.MAX_EXTRACT_BATCH["cuda"]
    assert extract_batch_size(None, 64 * 2**30, "cuda") == 1
    assert extract_batch_size(None, 2**20, "cpu") == backbones.MAX_EXTRACT_BATCH["cpu"] == 1
    assert extract_batch_size(None, None, "cuda") == 1
    assert extract_batch_size(3, 64 * 2**30, "cpu") == 3
    with pytest.raises(ValueError, match="--extract_batch must be >= 1"):
        extract_batch_size(0, None, "cpu")


def test_ddpm_extractor_estimates_its_memory_per_image():
    extractor = _ddpm()
    extractor(_images(1)[0])
    one = extractor.bytes_per_image
    extractor(_images(2))
    assert one > 0 and extractor.bytes_per_image == one


def test_image_tensor_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        image_tensor(np.zeros((4, 4), np.uint8), "cpu", "symmetric")
