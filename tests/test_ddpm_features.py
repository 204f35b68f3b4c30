import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm_seg.backbones import shared_noise
from ddpm_seg.backbones.ddpm import DDPMFeatureExtractor
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16", num_head_channels=16,
            learn_sigma=True, diffusion_steps=100)
STEPS, BLOCKS = [5, 40], [1, 3, 5]


def _model():
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY})
    return model.eval(), diffusion


def _reference_features(model, diffusion, image, noise, input_activations=False):
    """The original's way: one full forward per step, hooks on every block, upsample each map, concatenate."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 127.5 - 1
    grabbed, handles = {}, []
    for b in BLOCKS:
        def hook(module, inputs, output, b=b):
            grabbed[b] = inputs[0] if input_activations else output
        handles.append(model.output_blocks[b].register_forward_hook(hook))
    maps = []
    with torch.no_grad():
        for t in STEPS:
            tt = torch.tensor([t])
            model(diffusion.q_sample(x, tt, noise=noise), tt)
            maps += [grabbed[b] for b in BLOCKS]
    for h in handles:
        h.remove()
    return torch.cat([F.interpolate(m, size=(32, 32), mode="bilinear") for m in maps], dim=1)[0]


@pytest.mark.parametrize("input_activations", [False, True])
def test_features_equal_full_forward_and_upsampling(input_activations):
    model, diffusion = _model()
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    noise = shared_noise(7, 1, (3, 32, 32), torch.device("cpu"))
    extractor = DDPMFeatureExtractor(model, diffusion, STEPS, BLOCKS, input_activations, noise)
    maps = extractor(image)
    assert len(maps) == len(STEPS) * len(BLOCKS)
    ours = torch.cat([F.interpolate(m[None], size=(32, 32), mode="bilinear")[0] for m in maps])
    expected = _reference_features(model, diffusion, image, noise, input_activations)
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=1e-5)


def test_forward_stops_after_the_deepest_hooked_block():
    model, diffusion = _model()
    ran = []
    model.output_blocks[6].register_forward_hook(lambda *a: ran.append(6))
    model.out.register_forward_hook(lambda *a: ran.append("out"))
    extractor = DDPMFeatureExtractor(model, diffusion, STEPS, BLOCKS, False, None)
    extractor(np.zeros((32, 32, 3), dtype=np.uint8))
    assert ran == []


def test_shared_noise_is_seeded_and_fresh_noise_is_not():
    model, diffusion = _model()
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    a = DDPMFeatureExtractor(model, diffusion, STEPS, BLOCKS, False, shared_noise(1, 1, (3, 32, 32), "cpu"))(image)
    b = DDPMFeatureExtractor(model, diffusion, STEPS, BLOCKS, False, shared_noise(1, 1, (3, 32, 32), "cpu"))(image)
    c = DDPMFeatureExtractor(model, diffusion, STEPS, BLOCKS, False, None)(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[0], c[0])


def test_without_shared_noise_an_image_gets_its_own_noise_whatever_is_extracted_beside_it():
    """Each image's noise is seeded by the run's seed and its pixels: a resumed extraction, an evaluation and
    predict give one image the same features, and two images get different noise."""
    model, diffusion = _model()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    images[2] = images[0]
    extractor = DDPMFeatureExtractor(model, diffusion, STEPS, BLOCKS, False, None, noise_seed=4)
    alone = extractor(images[1])
    extractor(images[0])  # what was extracted before does not matter
    batched = extractor(images)
    assert all(torch.allclose(a, b[1], atol=1e-5) for a, b in zip(alone, batched))
    assert all(torch.equal(b[0], b[2]) for b in batched)  # the same pixels, the same noise
    noised = []
    original_q_sample = diffusion.q_sample
    diffusion.q_sample = lambda x, t, noise: noised.append(noise) or original_q_sample(x, t, noise=noise)
    extractor(images[:2])
    DDPMFeatureExtractor(model, diffusion, STEPS, BLOCKS, False, None, noise_seed=5)(images[:1])
    steps = len(STEPS)
    assert not torch.equal(noised[0][:steps], noised[0][steps:])  # two images, two noises
    assert not torch.equal(noised[0][0], noised[0][1])  # a noise per step
    assert not torch.equal(noised[0][:steps], noised[1])  # another seed, another noise


def test_out_of_range_blocks_and_steps():
    model, diffusion = _model()
    with pytest.raises(ValueError, match=r"blocks \[8\] out of range: this UNet has output blocks 0..7"):
        DDPMFeatureExtractor(model, diffusion, STEPS, [1, 8], False, None)
    with pytest.raises(ValueError, match=r"steps \[100\] out of range: the diffusion has timesteps 0..99"):
        DDPMFeatureExtractor(model, diffusion, [5, 100], BLOCKS, False, None)


def test_noise_draws_average_single_draws_and_draw_zero_is_the_original_noise():
    model, diffusion = _model()
    image = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    noise = shared_noise(5, 3, (3, 32, 32), "cpu")
    assert torch.equal(noise[:1], shared_noise(5, 1, (3, 32, 32), "cpu"))  # noise_draws 1 keeps the paper's features
    three = DDPMFeatureExtractor(model, diffusion, STEPS, BLOCKS, False, noise, noise_draws=3)(image)
    singles = [DDPMFeatureExtractor(model, diffusion, STEPS, BLOCKS, False, noise[k:k + 1])(image) for k in range(3)]
    for i, fmap in enumerate(three):
        mean = sum(s[i] for s in singles) / 3
        assert torch.allclose(fmap, mean, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(fmap, singles[0][i], atol=1e-3)  # the other draws count
    with pytest.raises(ValueError, match="shared noise holds 3 draws, noise_draws x test views is 2"):
        DDPMFeatureExtractor(model, diffusion, STEPS, BLOCKS, False, noise, noise_draws=2)


def test_noise_draws_in_config_and_run_folder():
    from ddpm_seg.config import experiment_suffix, validate_experiment
    cfg = dict(exp_dir="x", model_type="ddpm", category="demo", number_class=2, ignore_label=255,
               training_path="a", testing_path="b", model_path="m", dim=[32, 32, 96], steps=[50], blocks=[1],
               model_num=1, batch_size=64, training_number=1, testing_number=1, upsample_mode="bilinear",
               share_noise=True, input_activations=False, class_names=["a", "b"])
    assert experiment_suffix(validate_experiment(dict(cfg))) == "50_1"
    assert experiment_suffix(validate_experiment(dict(cfg, noise_draws=4))) == "50_1_draws4"
    with pytest.raises(ValueError, match="'noise_draws' must be >= 1, got 0"):
        validate_experiment(dict(cfg, noise_draws=0))
    with pytest.raises(ValueError, match=r"'noise_draws' applies only to model_type \['ddpm', 'diffusers'\], not 'mae'"):
        validate_experiment(dict(cfg, model_type="mae", steps=[], blocks=[], noise_draws=2))
