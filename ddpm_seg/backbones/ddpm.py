"""DDPM features: noise the image at a few timesteps and read UNet decoder blocks with forward hooks."""

import numpy as np
import torch

from guided_diffusion.checkpoint import load_ddpm
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

from . import image_tensor, register


class _StopForward(Exception):
    """Raised by the hook of the deepest block we read: nothing after it is needed, so the rest of the UNet
    (about half its FLOPs at the paper's blocks) is skipped."""


class DDPMFeatureExtractor:
    def __init__(self, model, diffusion, steps, blocks, input_activations=False, noise=None):
        num_blocks = len(model.output_blocks)
        bad_blocks = [b for b in blocks if not 0 <= b < num_blocks]
        if bad_blocks:
            raise ValueError(f"blocks {bad_blocks} out of range: this UNet has output blocks 0..{num_blocks - 1}")
        bad_steps = [t for t in steps if not 0 <= t < diffusion.num_timesteps]
        if bad_steps:
            raise ValueError(f"steps {bad_steps} out of range: the diffusion has timesteps 0..{diffusion.num_timesteps - 1}")
        if not steps or not blocks:
            raise ValueError("a DDPM experiment needs at least one step and one block")
        self.model, self.diffusion = model, diffusion
        self.steps, self.blocks = list(steps), list(blocks)
        self.input_activations = input_activations
        # One seeded noise for all images and steps (share_noise), made on the model's device as the original does.
        self.noise = noise
        self._activations = {}

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _hook(self, block, stop):
        def hook(module, inputs, output):
            self._activations[block] = inputs[0] if self.input_activations else output
            if stop:
                raise _StopForward

        return hook

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> list:
        """uint8 [H, W, 3] -> maps [C, h, w] (float32), step-major: [t0: b0 b1 .. | t1: ...]."""
        x = image_tensor(image, self.device, "symmetric").expand(len(self.steps), -1, -1, -1)
        t = torch.tensor(self.steps, device=self.device)
        noise = self.noise.expand_as(x) if self.noise is not None else torch.randn_like(x)
        x_t = self.diffusion.q_sample(x, t, noise=noise)
        self._activations.clear()
        # Hooks live only for this call, so the model stays usable as a plain UNet elsewhere.
        last = max(self.blocks)
        handles = [self.model.output_blocks[b].register_forward_hook(self._hook(b, stop=(b == last)))
                   for b in sorted(set(self.blocks))]
        try:
            self.model(x_t, t)  # the raw integer timestep, as the official feature extractor passes it
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [self._activations[b][i].float() for i in range(len(self.steps)) for b in self.blocks]


def shared_noise(seed: int, image_size, device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(1, 3, *image_size, generator=generator, device=device)


@register("ddpm")
def build_ddpm(cfg, model_flags, device, seed, random_init):
    # Features come from the full noising process whatever respacing a sampler may use.
    flags = {**model_and_diffusion_defaults(), **model_flags, "image_size": cfg["dim"][0], "timestep_respacing": ""}
    if random_init:
        torch.manual_seed(seed)
        model, diffusion = create_model_and_diffusion(**flags)
        model.to(device).eval()
    else:
        model, diffusion = load_ddpm(cfg["model_path"], flags, device)
    noise = shared_noise(seed, cfg["dim"][:2], device) if cfg["share_noise"] else None
    return DDPMFeatureExtractor(model, diffusion, cfg["steps"], cfg["blocks"], cfg["input_activations"], noise)
