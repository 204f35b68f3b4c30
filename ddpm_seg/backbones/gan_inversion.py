"""GAN Inversion features (a baseline of the paper): each image is projected into the latent space of a StyleGAN2
trained on its domain by optimisation, and the generator's activations for the latent found are its features.

The projection is StyleGAN2's projector (Karras et al. 2020; the settings below are its, not the paper's): Adam
from w_avg for `inversion_steps` (1000) at `inversion_lr` (0.1) with its ramps, latent noise decaying over the
first 3/4 of the steps, per-image noise maps optimised under its regularisation (`optimize_noise`), and the
LPIPS-VGG16 distance (`perceptual_loss` 'lpips'; 'mse' is the cheap alternative) of the generated image,
downsampled to the input's size (at most 256), to the image. `latent_space` 'w' optimises one w (the
projector's), 'w+' one per layer. The features are the synthesis block outputs at the resolutions listed in
`blocks`, ascending, with min(32768 / r, 512) channels each (2944 for 4..256), for the inverted latent and the
image's noise maps. Randomness (noise maps, latent noise) is drawn from the builder's seed and the image's
pixels, so an image always gets the same features. The optimisation runs in float32; the final block outputs
in `dtype`. The generator and its file formats are stylegan2.py's.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..lpips import load_lpips
from . import batch_result, image_noise, image_tensor, register
from .stylegan2 import ARCHITECTURES, StyleGAN2Generator, build_generator

# StyleGAN2's projector (Karras et al. 2020; projector.py of NVlabs/stylegan2 and stylegan2-ada-pytorch).
W_STD_SAMPLES = 10000  # z samples whose w spread scales the latent noise
W_STD_SEED = 123
INITIAL_NOISE_FACTOR = 0.05
NOISE_RAMP_LENGTH = 0.75
LR_RAMPUP_LENGTH = 0.05
LR_RAMPDOWN_LENGTH = 0.25
REGULARIZE_NOISE_WEIGHT = 1e5
PERCEPTUAL_SIZE = 256  # the projector compares images at most 256x256 (VGG16 was built for 224x224)
LATENT_SPACES = ("w", "w+")
PERCEPTUAL_LOSSES = ("lpips", "mse")
INVERSION_DEFAULTS = dict(inversion_steps=1000, latent_space="w", inversion_lr=0.1, perceptual_loss="lpips",
                          optimize_noise=True)
INVERSION_CONFIG_KEYS = {
    "generator": (str, False),  # an ARCHITECTURES name: the architecture --random_init builds
    "inversion_steps": (int, False),
    "latent_space": (str, False),  # "w": one w for every layer (the projector's); "w+": one w per layer
    "inversion_lr": (float, False),
    "perceptual_loss": (str, False),  # "lpips" (the projector's) or "mse"
    "perceptual_vgg16_path": (str, False),  # torchvision vgg16 state_dict (lpips)
    "perceptual_lpips_path": (str, False),  # LPIPS weights/v0.1/vgg.pth (lpips)
    "optimize_noise": (bool, False),  # optimise the noise maps too, with the projector's regularisation
}


def check_inversion_config(cfg: dict, path: str) -> None:
    """Refuse gan_inversion settings that cannot run, one line each."""
    options = {**INVERSION_DEFAULTS, **{k: v for k, v in cfg.items() if k in INVERSION_CONFIG_KEYS}}
    if not cfg["blocks"] or any(b < 4 or b & (b - 1) for b in cfg["blocks"]):
        raise ValueError(f"{path}: 'blocks' must list generator resolutions to read (powers of two from 4), "
                         f"got {cfg['blocks']}")
    if cfg["dim"][0] != cfg["dim"][1]:
        raise ValueError(f"{path}: gan_inversion needs square images (the generator's are), got dim {cfg['dim'][:2]}")
    if options["inversion_steps"] < 1:
        raise ValueError(f"{path}: 'inversion_steps' must be >= 1, got {options['inversion_steps']}")
    if not options["inversion_lr"] > 0:
        raise ValueError(f"{path}: 'inversion_lr' must be positive, got {options['inversion_lr']}")
    if options["latent_space"] not in LATENT_SPACES:
        raise ValueError(f"{path}: 'latent_space' must be one of {list(LATENT_SPACES)}, "
                         f"got {options['latent_space']!r}")
    if options["perceptual_loss"] not in PERCEPTUAL_LOSSES:
        raise ValueError(f"{path}: 'perceptual_loss' must be one of {list(PERCEPTUAL_LOSSES)}, "
                         f"got {options['perceptual_loss']!r}")
    paths = [k for k in ("perceptual_vgg16_path", "perceptual_lpips_path") if k in cfg]
    if options["perceptual_loss"] == "lpips" and len(paths) < 2:
        raise ValueError(f"{path}: perceptual_loss 'lpips' needs 'perceptual_vgg16_path' (torchvision vgg16 "
                         "state_dict) and 'perceptual_lpips_path' (LPIPS v0.1 vgg.pth)")
    if options["perceptual_loss"] == "mse" and paths:
        raise ValueError(f"{path}: {paths} apply only to perceptual_loss 'lpips', not 'mse'")
    if "generator" in cfg and cfg["generator"] not in ARCHITECTURES:
        raise ValueError(f"{path}: 'generator' must name a StyleGAN2 architecture ({sorted(ARCHITECTURES)}), "
                         f"got {cfg['generator']!r}")


def learning_rate(step: int, num_steps: int, initial: float) -> float:
    """The projector's schedule: a cosine ramp-down over the last quarter after a linear ramp-up over the first
    5% of the steps."""
    t = step / num_steps
    ramp = min(1.0, (1.0 - t) / LR_RAMPDOWN_LENGTH)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return initial * ramp * min(1.0, t / LR_RAMPUP_LENGTH)


def noise_regularisation(noise: list) -> torch.Tensor:
    """Per image [N]: squared autocorrelation of each noise map with its one-pixel shifts, at every scale
    down to 8x8, so that the optimised noise cannot carry the image's content."""
    total = 0
    for v in noise:
        while True:
            total = total + (v * v.roll(1, dims=3)).mean(dim=[1, 2, 3]).square()
            total = total + (v * v.roll(1, dims=2)).mean(dim=[1, 2, 3]).square()
            if v.shape[2] <= 8:
                break
            v = F.avg_pool2d(v, 2)
    return total


@torch.no_grad()
def normalise_noise(noise: list) -> None:
    """Each image's noise maps back to zero mean and unit variance, in place (after every projector step)."""
    for v in noise:
        v -= v.mean(dim=[1, 2, 3], keepdim=True)
        v *= v.square().mean(dim=[1, 2, 3], keepdim=True).rsqrt()


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square images [N, C, s, s] at side `size`, by area averaging (as the projector shrinks its images)."""
    return images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="area")


def target_size(target) -> int:
    """The side of a target: an image batch, or (LPIPS) its list of normalised features, the first of which
    (relu1_2) keeps the image's size."""
    return (target[0] if isinstance(target, list) else target).shape[-1]


class GANInversionFeatures:
    """Projects each image into the generator's latent space, then reads the synthesis block outputs at the
    configured resolutions for that latent (and the image's optimised noise)."""

    def __init__(self, generator: StyleGAN2Generator, perceptual, blocks, options: dict, seed: int,
                 dtype=torch.float32):
        too_fine = [r for r in blocks if r > generator.img_resolution]
        if too_fine:
            raise ValueError(f"blocks {too_fine} exceed the generator's resolution {generator.img_resolution}")
        self.generator, self.perceptual, self.blocks = generator, perceptual, list(blocks)
        self.options, self.seed, self.dtype = options, seed, dtype
        self.w_std = self.latent_spread()

    @property
    def device(self):
        return self.generator.w_avg.device

    @torch.no_grad()
    def latent_spread(self) -> float:
        """The spread of w around its mean over W_STD_SAMPLES seeded z samples (scales the latent noise)."""
        z = np.random.RandomState(W_STD_SEED).randn(W_STD_SAMPLES, self.generator.z_dim)
        w = self.generator.mapping(torch.from_numpy(z).float().to(self.device))[:, 0]
        return float((w - w.mean(dim=0)).square().sum().div(W_STD_SAMPLES).sqrt())

    def loss_size(self, input_size: int) -> int:
        """The side at which the loss compares images: the smaller of the generator's and the input's, at most
        PERCEPTUAL_SIZE for LPIPS."""
        size = min(self.generator.img_resolution, input_size)
        return min(size, PERCEPTUAL_SIZE) if self.perceptual is not None else size

    def distance(self, synthesised: torch.Tensor, target) -> torch.Tensor:
        """Per image [N]: LPIPS distance to the target's features, or the mean squared error."""
        synthesised = downsample(synthesised, target_size(target))
        if self.perceptual is None:
            return (synthesised - target).square().mean(dim=[1, 2, 3])
        return self.perceptual.distance(self.perceptual.normalised_features(synthesised), target)

    def project(self, target: torch.Tensor, images: np.ndarray):
        """(ws [N, num_ws, w_dim], noise maps or None): StyleGAN2's projector run on every image at once (the
        loss is a sum over images, and Adam's steps are per element, so each image's run is its own)."""
        g, options, n = self.generator, self.options, len(target)
        layers = g.synthesis.layers()

        def draw(index: int, shape) -> torch.Tensor:
            # Drawn per image from (seed, the image's pixels, index): an image's inversion is the same whatever
            # is inverted beside it or before it. Indices: noise maps 0.., then the latent noise of each step.
            return image_noise(self.seed, images, 0, index, shape, self.device)

        with torch.no_grad():
            target = downsample(target, self.loss_size(target.shape[-1]))
            if self.perceptual is not None:
                target = self.perceptual.normalised_features(target)
        latent_count = g.num_ws if options["latent_space"] == "w+" else 1
        latent = g.w_avg.detach().float()[None, None].repeat(n, latent_count, 1).requires_grad_(True)
        noise = None
        if options["optimize_noise"]:
            noise = [draw(i, (1, *layer.noise_const.shape)).requires_grad_(True) for i, layer in enumerate(layers)]
        optimizer = torch.optim.Adam([latent] + (noise or []), betas=(0.9, 0.999), lr=options["inversion_lr"])
        steps = options["inversion_steps"]
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, options["inversion_lr"])
            latent_noise_scale = self.w_std * INITIAL_NOISE_FACTOR * max(0.0, 1 - step / steps / NOISE_RAMP_LENGTH) ** 2
            latent_noise = draw(len(layers) + step, (latent_count, g.w_dim)) * latent_noise_scale
            ws = (latent + latent_noise).expand(n, g.num_ws, g.w_dim)
            loss = self.distance(g.synthesis(ws, noise=noise)[0], target).sum()
            if noise is not None:
                loss = loss + REGULARIZE_NOISE_WEIGHT * noise_regularisation(noise).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if noise is not None:
                normalise_noise(noise)
        ws = latent.detach().expand(n, g.num_ws, g.w_dim)
        return ws, None if noise is None else [v.detach() for v in noise]

    def __call__(self, image: np.ndarray, view: int = 0) -> list:
        """uint8 [H, W, 3] -> one map [C, r, r] per configured resolution r (ascending); [N, H, W, 3] -> the
        same maps with a leading batch dimension. `view` changes nothing: an inversion depends on the pixels."""
        images = np.asarray(image)
        batch = images[None] if images.ndim == 3 else images
        target = image_tensor(batch, self.device, "symmetric")
        with torch.enable_grad():
            ws, noise = self.project(target, batch)
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with torch.no_grad(), autocast:
            _, maps = self.generator.synthesis(ws, read=self.blocks, noise=noise)
        return batch_result(image, maps)


@register("gan_inversion", config_keys=INVERSION_CONFIG_KEYS, check_config=check_inversion_config)
def build_gan_inversion(cfg, model_flags, device, seed, random_init, dtype):
    options = {**INVERSION_DEFAULTS, **cfg.backbone_options}
    generator = build_generator(cfg, seed, random_init)
    perceptual = None
    if options["perceptual_loss"] == "lpips":
        perceptual = load_lpips(options["perceptual_vgg16_path"], options["perceptual_lpips_path"]).to(device)
    # The projection runs in float32 (Adam on bf16/fp16 latents would stall); `dtype` computes the features.
    generator.to(device)
    return GANInversionFeatures(generator, perceptual, cfg.blocks, options, seed, dtype)
