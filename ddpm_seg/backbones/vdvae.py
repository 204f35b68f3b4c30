"""VDVAE features: the activations of the public FFHQ-256 Very Deep VAE (Child, 2021) as it encodes an image and
decodes it from its posterior latents.

The paper uses VDVAE as an autoencoder baseline on the face datasets only (FFHQ-34 and CelebA-19, both with the
public FFHQ-256 model, as none was released for LSUN): intermediate activations of the encoder and the decoder,
upsampled to the image and concatenated. Which layers and resolutions are read is this file's choice, both
networks once per resolution:

- encoder, resolution r: the encoder's activation at r, the map the decoder's posterior blocks at r read (the
  output of the last encoder block whose output has resolution r);
- decoder, resolution r: the decoder's activation stream after its last block at r (at the image resolution,
  after the decoder's output gain and bias, i.e. what its pixel-distribution head reads).

`blocks` lists resolutions (1, 4, 8, 16, 32, 64, 128, 256 for FFHQ-256); the config's own `streams` picks
"encoder" and/or "decoder" (default both, in that order). Maps come stream by stream, resolutions ascending
within a stream, each `width` (512) channels: the paper configs read every resolution of both streams, 8192
features per pixel. `input_activations` does not apply.

Latents: the original reconstructs an image from posterior samples z ~ q(z | x, z_<), which makes features vary
from call to call. `latents` "posterior_mean" (default) decodes from the posterior means, so an image always has
the same features; "posterior_sample" draws them as the original does, with noise seeded by the run's seed and the
image's pixels (share_noise does not apply), so repeated extraction still agrees.

Input: the uint8 image shifted and scaled by the FFHQ-256 pixel statistics the model was trained with
(data.py; the 5-bit quantisation there applies to the loss target only, not to the encoder's input). Files:
the released `ffhq256-iter-1700000-model-ema.th` (a plain state_dict of the VAE; the non-EMA `-model.th` has
DistributedDataParallel 'module.' prefixes, stripped as the original's loader does). The pixel head
`decoder.out_net` is loaded with the rest but never run.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.checkpoint import load_state_dict_strict, read_state_dict

from . import batch_result, image_noise, register

# The released FFHQ-256 model (openai/vdvae hps.py "ffhq256", with the argument defaults it inherits).
# Block strings: "RxN" N blocks at resolution R; "RdD" a block at R that then average-pools by D; "RmM" a
# decoder block at R whose input adds the stream at resolution M, upsampled.
ARCHITECTURE = dict(
    width=512, zdim=16, bottleneck_multiple=0.25, no_bias_above=64, num_mixtures=10,
    enc_blocks="256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4",
    dec_blocks="1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128",
)
# data.py, ffhq_256: the encoder's input is (x + shift) * scale for 8-bit pixel values x.
PIXEL_SHIFT = -112.8666757481
PIXEL_SCALE = 1 / 69.84780273
STREAMS = ("encoder", "decoder")
LATENTS = ("posterior_mean", "posterior_sample")


def parse_blocks(spec: str) -> list:
    """A block string -> [(resolution, down rate or mixin resolution or None)], one entry per block."""
    blocks = []
    for part in spec.split(","):
        if "x" in part:
            res, count = part.split("x")
            blocks += [(int(res), None)] * int(count)
        elif "m" in part or "d" in part:
            res, other = part.replace("m", "d").split("d")
            blocks.append((int(res), int(other)))
        else:
            blocks.append((int(part), None))
    return blocks


def resolutions(architecture: dict) -> list:
    """The decoder's resolutions, ascending: the values `blocks` may list."""
    return sorted({res for res, _ in parse_blocks(architecture["dec_blocks"])})


def conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    """VDVAE's convolutions: stride 1, 'same' padding, biases starting at zero."""
    layer = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(layer.bias)
    return layer


class Block(nn.Module):
    """GELU before each of four convolutions (1x1, 3x3, 3x3, 1x1; all 1x1 at resolutions 1 and 2), optionally
    residual, optionally average-pooled after."""

    def __init__(self, in_width, middle_width, out_width, res, down_rate=None, residual=False):
        super().__init__()
        k = 3 if res > 2 else 1
        self.c1 = conv(in_width, middle_width, 1)
        self.c2 = conv(middle_width, middle_width, k)
        self.c3 = conv(middle_width, middle_width, k)
        self.c4 = conv(middle_width, out_width, 1)
        self.down_rate = down_rate
        self.residual = residual

    def forward(self, x):
        h = x
        for layer in (self.c1, self.c2, self.c3, self.c4):
            h = layer(F.gelu(h))
        out = x + h if self.residual else h
        return F.avg_pool2d(out, self.down_rate) if self.down_rate else out


def scale_last(block: Block, num_blocks: int) -> None:
    """VDVAE's initialisation of residual branches: the last convolution scaled by 1/sqrt(depth)."""
    block.c4.weight.data *= math.sqrt(1 / num_blocks)


class Encoder(nn.Module):
    def __init__(self, width, bottleneck_multiple, enc_blocks):
        super().__init__()
        self.in_conv = conv(3, width, 3)
        layout = parse_blocks(enc_blocks)
        middle = int(width * bottleneck_multiple)
        self.enc_blocks = nn.ModuleList(Block(width, middle, width, res, down_rate=down, residual=True)
                                        for res, down in layout)
        for block in self.enc_blocks:
            scale_last(block, len(layout))

    def forward(self, x) -> dict:
        """Image [N, 3, R, R] -> {resolution: the last activation at that resolution}."""
        x = self.in_conv(x)
        activations = {x.shape[2]: x}
        for block in self.enc_blocks:
            x = block(x)
            activations[x.shape[2]] = x
        return activations


class DecBlock(nn.Module):
    """One top-down step at resolution `res`: posterior q(z | stream, encoder activation) from `enc`; the prior
    network's extra channels added to the stream; z projected into it; a residual block."""

    def __init__(self, width, zdim, bottleneck_multiple, res, mixin, num_blocks):
        super().__init__()
        self.res, self.mixin, self.zdim = res, mixin, zdim
        middle = int(width * bottleneck_multiple)
        self.enc = Block(2 * width, middle, 2 * zdim, res)
        # The prior predicts (mean, log sigma, stream update); its last layer starts at zero.
        self.prior = Block(width, middle, 2 * zdim + width, res)
        nn.init.zeros_(self.prior.c4.weight)
        self.z_proj = conv(zdim, width, 1)
        self.z_proj.weight.data *= math.sqrt(1 / num_blocks)
        self.resnet = Block(width, middle, width, res, residual=True)
        scale_last(self.resnet, num_blocks)

    def forward(self, x, acts, latent):
        """Stream x and encoder activation acts at this resolution -> the stream after this block.
        latent(mean, log sigma) picks z from the posterior."""
        mean, log_sigma = self.enc(torch.cat([x, acts], dim=1)).chunk(2, dim=1)
        x = x + self.prior(x)[:, 2 * self.zdim:]
        x = x + self.z_proj(latent(mean, log_sigma))
        return self.resnet(x)


class Decoder(nn.Module):
    def __init__(self, width, zdim, bottleneck_multiple, no_bias_above, num_mixtures, dec_blocks):
        super().__init__()
        layout = parse_blocks(dec_blocks)
        self.dec_blocks = nn.ModuleList(DecBlock(width, zdim, bottleneck_multiple, res, mixin, len(layout))
                                        for res, mixin in layout)
        # Learned starting streams at the low resolutions; above no_bias_above a stream starts at zero.
        self.bias_xs = nn.ParameterList(nn.Parameter(torch.zeros(1, width, res, res))
                                        for res in sorted({r for r, _ in layout}) if res <= no_bias_above)
        # The pixel-distribution head (a mixture of discretised logistics): in the file, unused for features.
        self.out_net = nn.ModuleDict({"out_conv": conv(width, num_mixtures * 10, 1)})
        self.gain = nn.Parameter(torch.ones(1, width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, width, 1, 1))

    def forward(self, activations: dict, latent) -> dict:
        """Encoder activations -> {resolution: the stream after the last block at it}, the image resolution's
        after the output gain and bias. latent(block index, mean, log sigma) picks each block's z."""
        n = next(iter(activations.values())).shape[0]
        xs = {bias.shape[2]: bias.expand(n, -1, -1, -1) for bias in self.bias_xs}
        for i, block in enumerate(self.dec_blocks):
            acts = activations[block.res]
            x = xs.get(block.res, torch.zeros_like(acts))
            if block.mixin is not None:
                x = x + F.interpolate(xs[block.mixin], scale_factor=block.res // block.mixin)  # nearest
            xs[block.res] = block(x, acts, lambda mean, log_sigma: latent(i, mean, log_sigma))
        top = max(xs)
        xs[top] = xs[top] * self.gain + self.bias
        return xs


class VDVAE(nn.Module):
    """VDVAE's encoder and decoder under the names of the released state_dicts."""

    def __init__(self, architecture: dict):
        super().__init__()
        a = architecture
        self.encoder = Encoder(a["width"], a["bottleneck_multiple"], a["enc_blocks"])
        self.decoder = Decoder(a["width"], a["zdim"], a["bottleneck_multiple"], a["no_bias_above"],
                               a["num_mixtures"], a["dec_blocks"])


def vdvae_input(image: np.ndarray, device, dtype) -> torch.Tensor:
    """uint8 [H, W, 3] or [N, H, W, 3] -> [N, 3, H, W], shifted and scaled by the FFHQ-256 pixel statistics."""
    x = torch.from_numpy(np.array(image)).to(device)
    x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x.permute(2, 0, 1)[None]
    return ((x.float() + PIXEL_SHIFT) * PIXEL_SCALE).to(dtype)


def check_layout(blocks: list, image_size, streams: list, latents: str, architecture: dict) -> None:
    """Refuse settings the architecture cannot give: resolutions it lacks, another image size, unknown streams."""
    allowed = resolutions(architecture)
    if not blocks or any(b not in allowed for b in blocks):
        raise ValueError(f"VDVAE 'blocks' are decoder resolutions, one or more of {allowed}; got {blocks}")
    top = allowed[-1]
    if list(image_size) != [top, top]:
        raise ValueError(f"VDVAE reads {top}x{top} images: dim {list(image_size)} must be [{top}, {top}, ...]")
    if not streams or any(s not in STREAMS for s in streams) or len(set(streams)) != len(streams):
        raise ValueError(f"VDVAE 'streams' lists each of {list(STREAMS)} at most once (at least one); got {streams}")
    if latents not in LATENTS:
        raise ValueError(f"VDVAE 'latents' must be one of {list(LATENTS)}, got {latents!r}")


def feature_options(cfg: dict) -> tuple:
    """(streams, latents) of a config's own keys, defaults filled in."""
    return cfg.get("streams", list(STREAMS)), cfg.get("latents", LATENTS[0])


def check_config(cfg: dict, path: str) -> None:
    try:
        check_layout(cfg["blocks"], cfg["dim"][:2], *feature_options(cfg), ARCHITECTURE)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def read_vdvae_state_dict(path: str) -> dict:
    """A released VDVAE file: a plain state_dict; 'module.' (DistributedDataParallel) prefixes stripped."""
    state_dict = read_state_dict(path, "VDVAE checkpoint")
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


class VDVAEFeatureExtractor:
    def __init__(self, vae: VDVAE, blocks: list, streams: list, latents: str, seed: int):
        self.vae = vae
        self.blocks = blocks
        self.streams = streams
        self.sample = latents == "posterior_sample"
        self.seed = seed
        self.image_size = max(block.res for block in vae.decoder.dec_blocks)

    @property
    def device(self):
        return self.vae.decoder.gain.device

    def latent_picker(self, image, view):
        """latent(block index, mean, log sigma) -> z: the mean, or a sample seeded by the image and view."""
        if not self.sample:
            return lambda i, mean, log_sigma: mean

        def sample(i, mean, log_sigma):
            eps = image_noise(self.seed, image, view, i, mean.shape[1:], self.device).to(mean.dtype)
            return mean + torch.exp(log_sigma) * eps

        return sample

    @torch.no_grad()
    def __call__(self, image: np.ndarray, view: int = 0) -> list:
        """uint8 [H, W, 3] -> maps [512, r, r] (float32): the encoder's at each resolution r of blocks, then the
        decoder's (per `streams`); [N, H, W, 3] -> the same maps with a leading batch dimension."""
        if np.shape(image)[-3:-1] != (self.image_size, self.image_size):
            raise ValueError(f"VDVAE reads {self.image_size}x{self.image_size} images, got {np.shape(image)[-3:-1]}")
        x = vdvae_input(image, self.device, self.vae.decoder.gain.dtype)
        encoded = self.vae.encoder(x)
        decoded = self.vae.decoder(encoded, self.latent_picker(image, view))
        taken = {"encoder": encoded, "decoder": decoded}
        return batch_result(image, [taken[stream][res] for stream in self.streams for res in self.blocks])


# streams: which networks' activations, in order (default both); latents: posterior means or seeded samples.
@register("vdvae", config_keys={"streams": (list, False), "latents": (str, False)}, check_config=check_config)
def build_vdvae(cfg, model_flags, device, seed, random_init, dtype):
    streams, latents = feature_options(cfg.backbone_options)
    check_layout(cfg.blocks, cfg.dim[:2], streams, latents, ARCHITECTURE)
    if cfg.input_activations:
        raise ValueError("input_activations does not apply to model_type 'vdvae': set it to false")
    if random_init:
        torch.manual_seed(seed)
    vae = VDVAE(ARCHITECTURE)
    if not random_init:
        load_state_dict_strict(vae, read_vdvae_state_dict(cfg.model_path), cfg.model_path, hints=None)
    vae.to(device, dtype).eval()
    return VDVAEFeatureExtractor(vae, cfg.blocks, streams, latents, seed)
