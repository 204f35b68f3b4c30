"""DDPM features: noise the image at a few timesteps and read UNet decoder blocks with forward hooks."""

import numpy as np
import torch

from guided_diffusion.checkpoint import load_ddpm
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

from . import batch_result, check_noise_draws, image_noise, image_tensor, register, shared_noise, view_noise


class _StopForward(Exception):
    """Raised by the hook of the deepest block we read: nothing after it is needed, so the rest of the UNet
    (about half its FLOPs at the paper's blocks) is skipped."""


class DDPMFeatureExtractor:
    def __init__(self, model, diffusion, steps, blocks, input_activations=False, noise=None, noise_draws=1, views=1,
                 noise_seed=0):
        num_blocks = len(model.output_blocks)
        bad_blocks = [b for b in blocks if not 0 <= b < num_blocks]
        if bad_blocks:
            raise ValueError(f"blocks {bad_blocks} out of range: this UNet has output blocks 0..{num_blocks - 1}")
        bad_steps = [t for t in steps if not 0 <= t < diffusion.num_timesteps]
        if bad_steps:
            raise ValueError(f"steps {bad_steps} out of range: the diffusion has timesteps 0..{diffusion.num_timesteps - 1}")
        if not steps or not blocks:
            raise ValueError("a DDPM experiment needs at least one step and one block")
        check_noise_draws(noise, noise_draws, views)
        self.model, self.diffusion = model, diffusion
        self.steps, self.blocks = list(steps), list(blocks)
        self.input_activations = input_activations
        # share_noise: draw k is one seeded noise [3, H, W] for all images and steps, made on the model's device as
        # the original does; its first draw is the original's noise, so noise_draws 1 gives the original features.
        # Test view v uses draws v * noise_draws ... (v + 1) * noise_draws - 1. Without it (noise None), each
        # image's noise is seeded by noise_seed and its pixels (image_noise).
        self.noise, self.noise_draws, self.noise_seed = noise, noise_draws, noise_seed
        self.bytes_per_image = None  # known after the first call
        self._activations = {}

    @property
    def device(self):
        return next(self.model.parameters()).device

    def at_steps(self, steps):
        """The same extractor (model, blocks, noise) reading other steps: what the sweep needs."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__, steps=list(steps), _activations={})
        return other

    def _hook(self, block, stop):
        def hook(module, inputs, output):
            self._activations[block] = inputs[0] if self.input_activations else output
            if stop:
                raise _StopForward

        return hook

    @torch.no_grad()
    def __call__(self, image: np.ndarray, view: int = 0) -> list:
        """uint8 [H, W, 3] -> maps [C, h, w], or [N, H, W, 3] -> maps [N, C, h, w] (float32), step-major:
        [t0: b0 b1 .. | t1: ...], each the mean over noise_draws draws. Every image and step of a draw go
        through one truncated forward."""
        x = image_tensor(image, self.device, "symmetric")
        num_images, num_steps = x.shape[0], len(self.steps)
        # Image-major: image i's steps are rows i*S .. i*S+S-1.
        x = x.repeat_interleave(num_steps, dim=0)
        t = torch.tensor(self.steps, device=self.device).repeat(num_images)
        shared = view_noise(self.noise, self.noise_draws, view)
        sums = None
        for k in range(self.noise_draws):
            if shared is not None:
                noise = shared[k].expand_as(x)  # share_noise: the same noise for every image and step
            else:  # each image's own noise for each step, image-major as x
                noise = image_noise(self.noise_seed, image, view, k, (num_steps, *x.shape[1:]), self.device)
                noise = noise.flatten(0, 1).to(x.dtype)
            acts = self._forward(self.diffusion.q_sample(x, t, noise=noise), t, num_images)
            sums = acts if sums is None else {b: sums[b].add_(a) for b, a in acts.items()}
        maps = [sums[b].unflatten(0, (num_images, num_steps))[:, i] for i in range(num_steps) for b in self.blocks]
        if self.noise_draws > 1:
            maps = [m / self.noise_draws for m in maps]
        return batch_result(image, maps)

    def _forward(self, x_t, t, num_images) -> dict:
        """{block: activation [N*S, C, h, w]} of one forward, stopped after the deepest block read."""
        self._activations.clear()
        # Hooks live only for this call, so the model stays usable as a plain UNet elsewhere.
        last = max(self.blocks)
        handles = [self.model.output_blocks[b].register_forward_hook(self._hook(b, stop=(b == last)))
                   for b in sorted(set(self.blocks))]
        skip_bytes = []
        handles += [block.register_forward_hook(lambda m, i, out: skip_bytes.append(out.numel() * out.element_size()))
                    for block in self.model.input_blocks]
        try:
            self.model(x_t, t)  # the raw integer timestep, as the official feature extractor passes it
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        # The skips the decoder holds, twice over for the blocks' working tensors: what one more image costs.
        self.bytes_per_image = 2 * sum(skip_bytes) // num_images
        return {b: self._activations[b].float() for b in set(self.blocks)}


@register("ddpm", noised=True, model_flags=True)
def build_ddpm(cfg, model_flags, device, seed, random_init, dtype):
    # Features come from the full noising process whatever respacing a sampler may use. The body's dtype
    # is set below from `dtype`, which already follows use_fp16 on CUDA under --extract_dtype auto.
    flags = {**model_and_diffusion_defaults(), **model_flags, "image_size": cfg.dim[0], "timestep_respacing": "",
             "use_fp16": False}
    if random_init:
        torch.manual_seed(seed)
        model, diffusion = create_model_and_diffusion(**flags)
        model.to(device).eval()
    else:
        model, diffusion = load_ddpm(cfg.model_path, flags, device)
    model.convert_body(dtype)
    draws, views = cfg.noise_draws, cfg.test_views
    noise = shared_noise(seed, draws * views, (3, *cfg.dim[:2]), device) if cfg.share_noise else None
    return DDPMFeatureExtractor(model, diffusion, cfg.steps, cfg.blocks, cfg.input_activations, noise, draws,
                                views, noise_seed=seed)
