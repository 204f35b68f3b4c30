"""Timestep respacing: run a diffusion trained with T steps on a subset of them (fewer sampling steps)."""
import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts) -> set:
    """Pick which of the original timesteps to keep.

    :param section_counts: a list of ints or a comma string like "10,15,20": the original steps are cut into
        that many (near) equal sections and each section is strided evenly to its count, ends included.
        "250" is one section of 250 steps. "ddimN" instead uses DDIM's fixed integer stride, which gives
        range(0, num_timesteps, stride) with exactly N elements.
    :return: the set of kept timesteps (indices into the original process).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = _parse_int(section_counts[len("ddim"):], section_counts)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} of {num_timesteps} steps with an integer stride")
        section_counts = [_parse_int(part, section_counts) for part in section_counts.split(",")]

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    kept = []
    for i, count in enumerate(section_counts):
        # The first `extra` sections take one leftover step each.
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index (rather than multiply) so rounding matches the official picks.
        idx = 0.0
        for _ in range(count):
            kept.append(start + round(idx))
            idx += stride
        start += size
    return set(kept)


def _parse_int(text: str, whole: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"invalid timestep respacing {whole!r}: expected e.g. '250', '10,15,20' or 'ddim25'"
        ) from None


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over a subset of another one's timesteps.

    Betas are recomputed so alpha_bar at each kept step equals the original one, and the model is
    always called with the original timestep numbers, as it was trained on them.

    :param use_timesteps: the original timesteps to keep (e.g. from space_timesteps).
    :param kwargs: GaussianDiffusion's arguments for the original (full) process.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.original_num_steps = len(kwargs["betas"])
        self.use_timesteps = set(use_timesteps)
        if not self.use_timesteps or not self.use_timesteps <= set(range(self.original_num_steps)):
            raise ValueError(
                f"use_timesteps must be a non-empty subset of range({self.original_num_steps}), "
                f"got {sorted(self.use_timesteps)[:10]}..."
            )
        base = GaussianDiffusion(**kwargs)
        self.timestep_map = sorted(self.use_timesteps)
        kept_alpha_bar = base.alphas_cumprod[self.timestep_map]
        prev_alpha_bar = np.append(1.0, kept_alpha_bar[:-1])
        kwargs["betas"] = 1.0 - kept_alpha_bar / prev_alpha_bar
        super().__init__(**kwargs)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps)

    def _scale_timesteps(self, t):
        # The wrapped model maps (and optionally rescales) timesteps itself.
        return t


class _WrappedModel:
    """Calls the model with original timestep numbers in place of the respaced indices."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        new_ts = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
