"""Gaussian diffusion (Ho et al., 2020) with the learned-variance hybrid loss of Nichol & Dhariwal (2021).

Schedules are held as float64 numpy arrays for accuracy; values picked out for a batch of timesteps are
cast to the dtype and device of the tensor they multiply, so the same object serves CPU and CUDA.
Timestep t = 0 is the first noising step, t = num_timesteps - 1 the last.
"""
import enum
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas of a named schedule; both keep their shape in the limit of many steps.

    "linear": Ho et al.'s 1e-4 .. 0.02 over 1000 steps, with both ends scaled by 1000 / num_diffusion_timesteps.
    "cosine": Nichol & Dhariwal's squared-cosine alpha_bar with offset s = 0.008.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"unknown noise schedule {schedule_name!r}; expected 'linear' or 'cosine'")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1], into betas; max_beta avoids a singular last step."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


class ModelMeanType(enum.Enum):
    """What the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the added noise


class ModelVarType(enum.Enum):
    """How the variance of p(x_{t-1} | x_t) is chosen.

    LEARNED_RANGE interpolates (in log space) between FIXED_SMALL and FIXED_LARGE with a model output in [-1, 1].
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE on the mean target (+ the VB term when variances are learned)
    RESCALED_MSE = enum.auto()  # like MSE, with the VB term rescaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # like KL, rescaled by num_timesteps to estimate the full bound

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


def _extract(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] broadcast to like's shape, in like's dtype and on like's device."""
    values = torch.from_numpy(arr).to(device=like.device, dtype=like.dtype)[t.to(like.device)]
    return values.reshape(-1, *([1] * (like.ndim - 1))).expand(like.shape)


class GaussianDiffusion:
    """Forward noising, reverse sampling (ancestral and DDIM) and training losses for one beta schedule.

    :param betas: 1-D array of betas, one per step, from the first noising step to the last.
    :param model_mean_type / model_var_type / loss_type: see the enums above.
    :param rescale_timesteps: feed the model float timesteps scaled to the 0..1000 range.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(
                f"betas must be a 1-D array with values in (0, 1], got shape {betas.shape}, "
                f"range [{betas.min()}, {betas.max()}]"
            )
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; reuse the t = 1 value there so the log stays finite.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # FIXED_LARGE uses beta_t, except at t = 0 where the posterior variance gives a better decoder NLL.
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self.log_betas = np.log(betas)

    # ----- forward process -----

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0), each shaped like x_start."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = _extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = _extract(self.posterior_variance, t, x_t)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # ----- reverse process -----

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        ) * eps

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # Invert the posterior mean: xprev = coef1 * x_0 + coef2 * x_t.
        return _extract(1.0 / self.posterior_mean_coef1, t, x_t) * xprev - _extract(
            self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t
        ) * x_t

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def p_mean_variance(self, model, x, t, clip_denoised=True, model_kwargs=None):
        """Run the model to get p(x_{t-1} | x_t) and its x_0 prediction.

        :param model: called as model(x, timesteps, **model_kwargs).
        :param clip_denoised: clamp the x_0 prediction to [-1, 1] before forming the mean.
        :return: dict with "mean", "variance", "log_variance", "pred_xstart", each shaped like x.
        """
        model_kwargs = model_kwargs or {}
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            expected = (B, 2 * C, *x.shape[2:])
            if model_output.shape != expected:
                raise ValueError(
                    f"with a learned variance the model must output {expected} (mean and variance channels), "
                    f"got {tuple(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                min_log = _extract(self.posterior_log_variance_clipped, t, x)
                max_log = _extract(self.log_betas, t, x)
                frac = (var_values + 1) / 2  # model output -1 .. 1 spans min .. max
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                var_arr, log_var_arr = self.fixed_large_variance, self.fixed_large_log_variance
            else:
                var_arr, log_var_arr = self.posterior_variance, self.posterior_log_variance_clipped
            variance = _extract(var_arr, t, x)
            log_variance = _extract(log_var_arr, t, x)

        def process_xstart(x0):
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
            mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(self, model, x, t, clip_denoised=True, model_kwargs=None):
        """Sample x_{t-1} ~ p(x_{t-1} | x_t). Returns dict with "sample" and "pred_xstart"."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        noise = torch.randn_like(x)
        # The last step (t == 0) returns the mean: there is no x_{-1} to add noise for.
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, model_kwargs=None, eta=0.0):
        """One DDIM step (Song et al., 2021, eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        # Re-derive eps from the (possibly clipped) x_0 so that any mean type works.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sample = mean + nonzero * sigma * torch.randn_like(x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _sample_loop(self, step, model, shape, noise, device, progress, **step_kwargs):
        """Run `step` from t = num_timesteps - 1 down to 0 starting at noise; returns the final sample."""
        shape = tuple(shape)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {shape}")
        if device is None:
            device = noise.device if noise is not None else next(model.parameters()).device
        x = noise if noise is not None else torch.randn(*shape, device=device)
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            steps = tqdm(steps)
        for i in steps:
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            with torch.no_grad():
                x = step(model, x, t, **step_kwargs)["sample"]
        return x

    def p_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, model_kwargs=None, device=None, progress=False
    ):
        """Ancestral sampling of a batch of `shape` = (N, C, H, W); tqdm bar when progress."""
        return self._sample_loop(
            self.p_sample, model, shape, noise, device, progress,
            clip_denoised=clip_denoised, model_kwargs=model_kwargs,
        )

    def ddim_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, model_kwargs=None, device=None, progress=False, eta=0.0
    ):
        """DDIM sampling over this diffusion's steps (respace it first to take fewer)."""
        return self._sample_loop(
            self.ddim_sample, model, shape, noise, device, progress,
            clip_denoised=clip_denoised, model_kwargs=model_kwargs, eta=eta,
        )

    # ----- training -----

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound, in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the discretised decoder NLL at t = 0.
        :return: dict with "output" ([N] bits/dim) and "pred_xstart".
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example losses for a batch noised to timesteps t.

        :return: dict of [N] tensors: "loss", plus "mse" (MSE losses) and "vb" (when the variance is learned).
            With a learned variance the VB term sees the mean detached, so it trains only the variance
            and the MSE alone trains the mean (the hybrid loss of Nichol & Dhariwal).
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms
        if self.loss_type not in (LossType.MSE, LossType.RESCALED_MSE):
            raise ValueError(f"unsupported loss type {self.loss_type}")

        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            C = x_t.shape[1]
            model_output, var_values = torch.split(model_output, C, dim=1)
            frozen = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                lambda *args, **kwargs: frozen, x_start, x_t, t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Rescaling by the full num_timesteps would let the VB term swamp the MSE;
                # the /1000 keeps it equal to the unscaled term for the usual 1000 steps.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
