"""Gaussian diffusion: schedules, respacing, closed forms, losses and sampling loops."""
import math

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.script_util import create_gaussian_diffusion, create_model


def make_diffusion(steps=1000, var_type=gd.ModelVarType.FIXED_SMALL, mean_type=gd.ModelMeanType.EPSILON,
                   loss_type=gd.LossType.MSE, schedule="linear"):
    return gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule(schedule, steps),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
    )


def tiny_unet(learn_sigma, seed=0):
    torch.manual_seed(seed)
    return create_model(16, 32, 1, channel_mult="1,2", attention_resolutions="8", num_head_channels=16,
                        learn_sigma=learn_sigma, use_scale_shift_norm=True, resblock_updown=True)


class RecordingModel(torch.nn.Module):
    """Predicts zero noise (and mid-range variance) and records the timesteps it is called with."""

    def __init__(self, learn_sigma=False):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the loops a device to sample on
        self.learn_sigma = learn_sigma
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        channels = 2 * x.shape[1] if self.learn_sigma else x.shape[1]
        return torch.zeros(x.shape[0], channels, *x.shape[2:]) + self.anchor


# ----- schedules -----

def test_linear_schedule_values():
    d = make_diffusion(1000)
    assert d.sqrt_alphas_cumprod[[50, 150, 250]] == pytest.approx([0.9849, 0.8865, 0.7221], abs=5e-5)
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)
    # Fewer steps scale both ends by 1000 / n so the total noise stays comparable.
    short = gd.get_named_beta_schedule("linear", 250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08) and short.dtype == np.float64


def test_cosine_schedule_values():
    n = 1000
    betas = gd.get_named_beta_schedule("cosine", n)
    alpha_bar = np.cumprod(1 - betas)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2)  # sqrt of the continuous alpha_bar
    for t in (0, 100, 499, 900, 998):
        assert math.sqrt(alpha_bar[t]) == pytest.approx(f((t + 1) / n) / f(0.0), rel=1e-9)
    assert math.sqrt(alpha_bar[499]) == pytest.approx(0.7027, abs=1e-4)
    assert betas[-1] == 0.999  # the singular last step is clipped
    assert (np.diff(betas) > 0).all() and betas[0] < 1e-4


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="sigmoid"):
        gd.get_named_beta_schedule("sigmoid", 10)


# ----- respacing -----

def test_space_timesteps_ddim_uses_integer_stride():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert sorted(space_timesteps(1000, "ddim5")) == [0, 200, 400, 600, 800]
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")


def test_space_timesteps_sections():
    # Sections of 334, 333, 333 steps strided to 10, 15 and 20 picks, ends included.
    expected = {
        0, 37, 74, 111, 148, 185, 222, 259, 296, 333,
        334, 358, 381, 405, 429, 453, 476, 500, 524, 547, 571, 595, 619, 642, 666,
        667, 684, 702, 719, 737, 754, 772, 789, 807, 824, 842, 859, 877, 894, 912, 929, 947, 964, 982, 999,
    }
    assert space_timesteps(1000, "10,15,20") == expected
    assert space_timesteps(1000, [10, 15, 20]) == expected
    picks = space_timesteps(1000, "250")
    assert len(picks) == 250 and min(picks) == 0 and max(picks) == 999
    assert sorted(space_timesteps(1000, "10")) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    with pytest.raises(ValueError, match="section of 1000"):
        space_timesteps(1000, "2000")
    with pytest.raises(ValueError, match="respacing"):
        space_timesteps(1000, "fast")


def test_spaced_diffusion_keeps_alpha_bar_and_original_timesteps():
    base = make_diffusion(1000)
    kept = space_timesteps(1000, "10")
    spaced = SpacedDiffusion(kept, betas=base.betas, model_mean_type=base.model_mean_type,
                             model_var_type=base.model_var_type, loss_type=base.loss_type)
    assert spaced.num_timesteps == 10
    assert np.allclose(spaced.alphas_cumprod, base.alphas_cumprod[sorted(kept)], rtol=1e-12)

    model = RecordingModel()
    x = torch.randn(2, 3, 4, 4)
    spaced.p_mean_variance(model, x, torch.tensor([9, 1]))
    assert model.seen[-1].tolist() == [999, 111]

    rescaled = create_gaussian_diffusion(steps=500, timestep_respacing="5", rescale_timesteps=True)
    rescaled.p_mean_variance(model, x, torch.tensor([4, 0]))
    assert model.seen[-1].dtype == torch.float32 and model.seen[-1].tolist() == [998.0, 0.0]  # 499 * 1000/500


# ----- closed forms -----

def test_q_sample_matches_closed_form():
    d = make_diffusion(1000)
    x0 = torch.full((20000, 1), 0.5, dtype=torch.float64)
    t = torch.full((20000,), 250)
    noise = torch.randn_like(x0)
    x_t = d.q_sample(x0, t, noise=noise)
    ab = d.alphas_cumprod[250]
    assert torch.allclose(x_t, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise, rtol=1e-12)

    sample = d.q_sample(x0, t)
    assert sample.mean().item() == pytest.approx(0.5 * math.sqrt(ab), abs=0.02)
    assert sample.var().item() == pytest.approx(1 - ab, rel=0.05)
    mean, var, log_var = d.q_mean_variance(x0[:3], t[:3])
    assert torch.allclose(mean, 0.5 * math.sqrt(ab) * torch.ones(3, 1, dtype=torch.float64))
    assert torch.allclose(log_var, torch.log(var))


def test_posterior_matches_gaussian_product():
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): combine the two Gaussians by precision."""
    d = make_diffusion(1000)
    x0 = torch.randn(4, 3, dtype=torch.float64)
    xt = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for row, step in enumerate(t.tolist()):
        beta, ab_prev = d.betas[step], d.alphas_cumprod_prev[step]
        precision = 1 / (1 - ab_prev) + (1 - beta) / beta
        expected_mean = (math.sqrt(ab_prev) * x0[row] / (1 - ab_prev) + math.sqrt(1 - beta) * xt[row] / beta) / precision
        assert torch.allclose(mean[row], expected_mean, rtol=1e-9)
        assert torch.allclose(var[row], torch.full((3,), 1 / precision, dtype=torch.float64), rtol=1e-9)
    assert torch.allclose(log_var[1:], torch.log(var[1:]))
    # At t = 0 the posterior variance is 0; its log is clipped to the t = 1 value to stay finite.
    zero = d.q_posterior_mean_variance(x0, xt, torch.zeros(4, dtype=torch.long))
    assert (zero[1] == 0).all() and torch.allclose(zero[2], torch.tensor(math.log(d.posterior_variance[1])).double())


def test_extracted_values_follow_input_dtype():
    d = make_diffusion(100)
    x = torch.ones(2, 3, dtype=torch.float32)
    assert d.q_sample(x, torch.tensor([0, 99])).dtype == torch.float32
    assert d.q_sample(x.double(), torch.tensor([0, 99])).dtype == torch.float64


def test_learned_range_variance_endpoints_and_fixed_large():
    d = make_diffusion(100, var_type=gd.ModelVarType.LEARNED_RANGE)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([5, 50])
    for value, expected in ((-1.0, d.posterior_log_variance_clipped), (1.0, np.log(d.betas))):
        model = lambda x_, t_, v=value: torch.cat([torch.zeros_like(x_), torch.full_like(x_, v)], dim=1)
        out = d.p_mean_variance(model, x, t)
        assert torch.allclose(out["log_variance"][:, 0, 0, 0], torch.from_numpy(expected[[5, 50]]))
    with pytest.raises(ValueError, match="learned variance"):
        d.p_mean_variance(lambda x_, t_: x_, x, t)

    large = make_diffusion(100, var_type=gd.ModelVarType.FIXED_LARGE)
    out = large.p_mean_variance(lambda x_, t_: torch.zeros_like(x_), x, t)
    assert torch.allclose(out["variance"][:, 0, 0, 0], torch.from_numpy(d.betas[[5, 50]]))


@pytest.mark.parametrize("mean_type", list(gd.ModelMeanType))
def test_oracle_model_recovers_true_posterior(mean_type):
    """A model that outputs the true eps / x_0 / posterior mean gives the true posterior: zero KL for t > 0."""
    d = make_diffusion(100, mean_type=mean_type)
    torch.manual_seed(0)
    x0 = torch.rand(3, 3, 4, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 30, 99])
    xt = d.q_sample(x0, t, noise=noise)
    target = {
        gd.ModelMeanType.EPSILON: noise,
        gd.ModelMeanType.START_X: x0,
        gd.ModelMeanType.PREVIOUS_X: d.q_posterior_mean_variance(x0, xt, t)[0],
    }[mean_type]
    out = d.p_mean_variance(lambda *_: target, xt, t, clip_denoised=False)
    assert torch.allclose(out["pred_xstart"], x0, atol=1e-7)
    terms = d._vb_terms_bpd(lambda *_: target, x0, xt, t, clip_denoised=False)["output"]
    assert terms[1:].abs().max() < 1e-8
    assert terms[0] > 0  # t = 0 is the decoder NLL, not a KL


def test_losses_helpers():
    m = torch.randn(5)
    assert torch.allclose(normal_kl(m, 0.3, m, 0.3), torch.zeros(5))
    assert normal_kl(torch.tensor(0.0), 0.0, 1.0, 0.0).item() == pytest.approx(0.5)
    # The 256 bins tile the real line, so their probabilities sum to one.
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(
        levels, means=torch.full_like(levels, 0.1), log_scales=torch.full_like(levels, math.log(0.3))
    )
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


# ----- training -----

@pytest.mark.parametrize("learn_sigma", [False, True])
def test_training_losses_tiny_unet(learn_sigma):
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=learn_sigma)
    model = tiny_unet(learn_sigma)
    torch.manual_seed(1)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    terms = diffusion.training_losses(model, x0, torch.tensor([0, 600]))
    assert ("vb" in terms) == learn_sigma
    for value in terms.values():
        assert value.shape == (2,) and torch.isfinite(value).all()
    expected = terms["mse"] + terms["vb"] if learn_sigma else terms["mse"]
    assert torch.allclose(terms["loss"], expected)


def test_hybrid_loss_detaches_mean_from_vb():
    """The VB term must train only the variance channels; the MSE trains the mean."""
    diffusion = create_gaussian_diffusion(steps=100, learn_sigma=True)

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mean = torch.nn.Parameter(torch.tensor(0.3))
            self.var = torch.nn.Parameter(torch.tensor(0.2))

        def forward(self, x, t):
            return torch.cat([self.mean * torch.ones_like(x), self.var * torch.ones_like(x)], dim=1)

    model = Constant()
    torch.manual_seed(0)
    terms = diffusion.training_losses(model, torch.rand(2, 3, 4, 4) * 2 - 1, torch.tensor([10, 60]))
    terms["vb"].sum().backward()
    assert model.mean.grad is None or model.mean.grad == 0
    assert model.var.grad != 0


def test_kl_loss_type():
    diffusion = create_gaussian_diffusion(steps=100, learn_sigma=True, use_kl=True)
    assert diffusion.loss_type == gd.LossType.RESCALED_KL
    terms = diffusion.training_losses(RecordingModel(learn_sigma=True), torch.zeros(2, 3, 4, 4), torch.tensor([0, 50]))
    assert set(terms) == {"loss"} and torch.isfinite(terms["loss"]).all() and (terms["loss"] > 0).all()


def test_optimisation_reduces_loss_on_fixed_batch():
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True)
    model = tiny_unet(learn_sigma=True)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1
    noise = torch.randn(4, 3, 16, 16, generator=gen)
    t = torch.tensor([100, 300, 500, 700])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = diffusion.training_losses(model, x0, t, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# ----- sampling -----

def test_p_sample_loop_tiny_unet_visits_original_timesteps():
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="10")
    model = tiny_unet(learn_sigma=True).eval()
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[1].tolist()))
    sample = diffusion.p_sample_loop(model, (2, 3, 16, 16), progress=True)
    assert sample.shape == (2, 3, 16, 16) and torch.isfinite(sample).all()
    assert [s[0] for s in seen] == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]


def test_ddim_sample_loop_tiny_unet_is_deterministic_at_eta_zero():
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="ddim5")
    model = tiny_unet(learn_sigma=True).eval()
    noise = torch.randn(2, 3, 16, 16)
    a = diffusion.ddim_sample_loop(model, (2, 3, 16, 16), noise=noise)
    b = diffusion.ddim_sample_loop(model, (2, 3, 16, 16), noise=noise)
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    c = diffusion.ddim_sample_loop(model, (2, 3, 16, 16), noise=noise, eta=1.0)
    assert torch.isfinite(c).all() and not torch.equal(a, c)
    with pytest.raises(ValueError, match="noise shape"):
        diffusion.ddim_sample_loop(model, (1, 3, 16, 16), noise=noise)


def test_p_sample_last_step_returns_mean():
    d = make_diffusion(100)
    x = torch.randn(2, 3, 4, 4)
    model = RecordingModel()
    t = torch.tensor([0, 0])
    mean = d.p_mean_variance(model, x, t)["mean"]
    assert torch.equal(d.p_sample(model, x, t)["sample"], mean)
    assert not torch.equal(d.p_sample(model, x, torch.tensor([5, 5]))["sample"],
                           d.p_mean_variance(model, x, torch.tensor([5, 5]))["mean"])
