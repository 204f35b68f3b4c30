"""Test views (config test_views): the interpreter reads an image flipped and turned, each view with its own
noise, turns each member's logits back and averages its probabilities over the views before the vote."""

import numpy as np
import pytest
import torch

from ddpm_seg.backbones import shared_noise
from ddpm_seg.backbones.ddpm import DDPMFeatureExtractor
from ddpm_seg.backbones.pixels import pixel_features
from ddpm_seg.config import validate_experiment
from ddpm_seg.ensemble import MLPEnsemble, predict_logits
from ddpm_seg.evaluate import majority_vote
from ddpm_seg.interpreter import VIEWS, Interpreter, unview_logits, view_image
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16", num_head_channels=16,
            learn_sigma=True, diffusion_steps=100)
STEPS, BLOCKS = [5, 40], [1, 3]
CFG = dict(exp_dir="x", model_type="ddpm", category="mine", number_class=4, ignore_label=255, training_path="a",
           testing_path="b", model_path="m", dim=[32, 32, 0], steps=STEPS, blocks=BLOCKS, model_num=3, batch_size=64,
           training_number=1, testing_number=1, upsample_mode="bilinear", share_noise=True, input_activations=False,
           class_names=["a", "b", "c", "d"])


def _image(shape=(32, 32, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _decisive(ensemble):
    """Small batch-norm running variances, so a fresh ensemble's members give far from uniform probabilities."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in (ensemble.bn1, ensemble.bn2):
            bn.running_mean.copy_(0.05 * torch.randn(bn.running_mean.shape, generator=gen))
            bn.running_var.copy_(1e-4 + 1e-4 * torch.rand(bn.running_var.shape, generator=gen))
    return ensemble.eval()


def _as_logits(image):
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()


def test_views_are_flips_and_turns_and_unview_inverts_them():
    image = _image()
    assert np.array_equal(view_image(image, 0), image)
    assert np.array_equal(view_image(image, 1), image[:, ::-1])
    assert np.array_equal(view_image(image, 2), image[::-1])
    assert np.array_equal(view_image(image, 3), image[::-1, ::-1])
    assert np.array_equal(view_image(image, 4), np.rot90(image))
    assert len({view_image(image, v).tobytes() for v in range(len(VIEWS))}) == 8  # eight different views
    for v in range(len(VIEWS)):
        assert torch.equal(unview_logits(_as_logits(view_image(image, v)), v), _as_logits(image))
    wide = _image((8, 12, 3))
    for v in range(4):  # the first four views keep a non-square image's shape
        assert view_image(wide, v).shape == wide.shape
        assert torch.equal(unview_logits(_as_logits(view_image(wide, v)), v), _as_logits(wide))


def _ddpm_interpreter(views):
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY})
    model.eval()
    noise = shared_noise(7, views, (3, 32, 32), "cpu")
    extractor = DDPMFeatureExtractor(model, diffusion, STEPS, BLOCKS, False, noise, views=views)
    dim = sum(m.shape[0] for m in extractor(_image()))
    ensemble = _decisive(MLPEnsemble(dim, 4, 3, seed=0))
    cfg = dict(CFG, dim=[32, 32, dim], test_views=views)
    return Interpreter(validate_experiment(cfg), extractor, ensemble), model, diffusion, noise


def test_each_view_has_its_own_noise_and_member_probabilities_are_averaged():
    interpreter, model, diffusion, noise = _ddpm_interpreter(views=3)
    image = _image(seed=1)
    probs = 0
    for v in range(3):
        # View v alone, with its own draw of the shared noise (view 0: draw 0, the original's noise).
        maps = DDPMFeatureExtractor(model, diffusion, STEPS, BLOCKS, False, noise[v:v + 1])(view_image(image, v))
        probs = probs + unview_logits(predict_logits(interpreter.ensemble, maps, (32, 32)), v).softmax(dim=1)
    logits = interpreter.logits([image])[0]
    torch.testing.assert_close(logits.exp(), probs / 3, rtol=1e-5, atol=1e-6)
    labels, uncertainty, _ = interpreter.segment([image])[0]
    assert np.array_equal(labels, majority_vote(probs.log()).numpy())
    # The views disagree somewhere: one view alone would give other probabilities.
    one_view = predict_logits(interpreter.ensemble, interpreter.features([image])[0], (32, 32)).softmax(dim=1)
    assert not torch.allclose(one_view, probs / 3, atol=1e-3)
    assert np.isfinite(uncertainty).all()
    with pytest.raises(ValueError, match="view 3 out of range: the shared noise was drawn for 3 test views"):
        interpreter.extractor(image, view=3)


def test_view_zero_keeps_the_original_features():
    with_views, _, _, _ = _ddpm_interpreter(views=4)
    single, _, _, _ = _ddpm_interpreter(views=1)
    image = _image(seed=2)
    for a, b in zip(with_views.extractor(image), single.extractor(image)):
        assert torch.equal(a, b)
    # One view is the paper's interpreter: the members' own logits, unchanged.
    assert torch.equal(single.logits([image])[0],
                       predict_logits(single.ensemble, single.features([image])[0], (32, 32)))


def test_pixel_features_read_alike_in_every_view():
    # A pixel's colour does not change when the image turns, so every view turned back gives the same
    # probabilities: views that were turned back wrongly would not.
    cfg = dict(CFG, model_type="pixels", steps=[], blocks=[], dim=[32, 32, 3])
    ensemble = _decisive(MLPEnsemble(3, 4, 3, seed=0))
    image = _image(seed=3)
    one = Interpreter(validate_experiment(cfg), pixel_features, ensemble).logits([image])[0]
    eight = Interpreter(validate_experiment(dict(cfg, test_views=8)), pixel_features, ensemble).logits([image])[0]
    torch.testing.assert_close(eight.exp(), one.softmax(dim=1), rtol=1e-5, atol=1e-6)


def test_config_refuses_test_views_out_of_range_or_turning_a_non_square_resolution():
    cfg = dict(CFG, dim=[32, 32, 96])
    assert validate_experiment(dict(cfg, test_views=8)).test_views == 8
    for bad in (0, 9):
        with pytest.raises(ValueError, match=rf"<config>: 'test_views' must be in 1..8 \(flips and quarter turns\), got {bad}"):
            validate_experiment(dict(cfg, test_views=bad))
    assert validate_experiment(dict(cfg, dim=[32, 48, 96], test_views=4)).test_views == 4
    with pytest.raises(ValueError, match="'test_views' 5 needs quarter turns, which a 32x48 resolution"):
        validate_experiment(dict(cfg, dim=[32, 48, 96], test_views=5))
