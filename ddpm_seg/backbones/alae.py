"""ALAE features: a StyleALAE's generator activations for the latent its own encoder gives the image.

The paper's ALAE baseline embeds an image into ALAE's latent space with ALAE's encoder and takes, as pixel
representations, the activations of the StyleGAN-like generator's blocks for that latent, upsampled to the
image and concatenated. This file builds StyleALAE as the official release defines it (podgorskiy/ALAE,
net.py: EncoderDefault, GeneratorDefault) and follows the release's reconstruction path
(make_figures/make_recon_figure_*.py):

- the image, scaled to [-1, 1], is brought to the encoder's resolution 2^(layer_count + 1): bilinearly
  upsampled when smaller (the FFHQ model encodes 1024x1024; the benchmark images are 256x256), averaged
  down when larger, as the original does;
- the encoder runs at full resolution (lod = layer_count - 1, blend 1); its latent w, the sum of every
  encoder block's two style outputs, is given to both style inputs of every generator block, with no
  truncation (the reconstruction scripts leave it out);
- the generator runs with noise (noise=True in the original). The original draws fresh noise on every call;
  here it is fixed so that an image always gets the same features: with `share_noise` one set of noise maps
  drawn from `seed` for every image, without it each image's own maps drawn from (seed, its pixels).

Block i of the generator works at 4 * 2^i pixels square; its map is the block's output: after the second
3x3 conv, noise, bias, leaky ReLU, instance norm and style modulation (AdaIN). `blocks` lists the blocks to
read (ascending); [] reads every block whose resolution is at most the image's. A block above the image's
resolution is refused: its map would only be shrunk back. The experiment configs read every block up to
256x256, blocks 0-6 (2496 channels for ffhq and celeba-hq256, 2016 for bedroom).

Config key `alae_config` names the released architecture (configs/<name>.yaml): ffhq, bedroom,
celeba-hq256 or celeba. Released files are the training checkpointer's dict {'models': {name: state_dict},
'auxiliary': {...}}; the smoothed encoder 'discriminator_s' and generator 'generator_s' are loaded strictly,
the rest (mapping networks, dlatent average, optimiser states) is not needed. The 'auxiliary' loss tracker
holds instances of the training code's own classes, which torch.load(weights_only=True) refuses: those two
class names alone are read as inert records (their data kept, nothing of theirs run) and dropped.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.checkpoint import CheckpointError, mismatch_report, safe_load

from . import batch_result, image_noise, image_tensor, register

# alae_config -> architecture of the released models (configs/<name>.yaml: LAYER_COUNT, START_CHANNEL_COUNT,
# MAX_CHANNEL_COUNT, LATENT_SPACE_SIZE). Images of the encoder and generator are 2^(layer_count + 1) square.
ARCHITECTURES = {
    "ffhq": dict(layer_count=9, start_channels=16, max_channels=512, latent_size=512),
    "bedroom": dict(layer_count=7, start_channels=32, max_channels=512, latent_size=512),
    "celeba-hq256": dict(layer_count=7, start_channels=64, max_channels=512, latent_size=512),
    "celeba": dict(layer_count=6, start_channels=64, max_channels=256, latent_size=256),
}
ENCODER_ENTRY, GENERATOR_ENTRY = "discriminator_s", "generator_s"  # the smoothed (EMA) models
# The loss tracker in a training checkpoint's 'auxiliary' entry pickles these classes of the training code.
TRAINING_RECORD_CLASSES = ("tracker.RunningMeanTorch", "tracker.RunningMean")
FUSED_SCALE_RESOLUTION = 128  # from this resolution on, resampling is fused into a strided convolution
LEAK = 0.2
ENCODER_NORM_EPS = 1e-5  # nn.InstanceNorm2d's default, as the encoder uses it
GENERATOR_NORM_EPS = 1e-8
SQRT2 = math.sqrt(2)


def leaky_relu(x):
    return F.leaky_relu(x, LEAK)


def instance_norm(x, eps):
    """Instance norm without affine parameters, its statistics in float32 (eps 1e-8 is below float16's range)."""
    return F.instance_norm(x.float(), eps=eps).to(x.dtype)


def channel_statistics(x):
    """[N, 2C]: each channel's spatial mean, then its standard deviation (biased, no eps), as the encoder's
    style inputs."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = ((x - mean) ** 2).mean(dim=(2, 3)).sqrt()
    return torch.cat([mean.flatten(1), std], dim=1)


def modulate(x, style):
    """Style modulation after instance norm: style [N, 2C] holds a scale (applied as 1 + scale), then a shift."""
    scale, shift = style.view(style.shape[0], 2, x.shape[1], 1, 1).unbind(1)
    return x * (scale + 1) + shift


def equalized_weight(shape, fan_in, gain):
    """ALAE's equalised-learning-rate layers store their weights pre-scaled: N(0, gain / sqrt(fan_in)) at init."""
    return nn.Parameter(torch.randn(shape) * (gain / math.sqrt(fan_in)))


class EqualizedLinear(nn.Module):
    def __init__(self, in_features, out_features, gain=SQRT2):
        super().__init__()
        self.weight = equalized_weight((out_features, in_features), in_features, gain)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class EqualizedConv(nn.Module):
    """A stride-1 convolution, 'same' padding."""

    def __init__(self, in_channels, out_channels, kernel_size, bias=False, gain=SQRT2):
        super().__init__()
        self.weight = equalized_weight((out_channels, in_channels, kernel_size, kernel_size),
                                       in_channels * kernel_size ** 2, gain)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)


def box_spread(weight):
    """The 3x3 kernel spread over 4x4: the sum of its four one-pixel shifts (a 3x3 conv and a 2x2 box filter
    fused into one kernel)."""
    w = F.pad(weight, (1, 1, 1, 1))
    return w[..., 1:, 1:] + w[..., :-1, 1:] + w[..., 1:, :-1] + w[..., :-1, :-1]


class DownsamplingConv(nn.Module):
    """3x3 conv then 2x2 average pooling, fused: the box-spread kernel (averaged) at stride 2."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.weight = equalized_weight((out_channels, in_channels, 3, 3), in_channels * 9, SQRT2)

    def forward(self, x):
        return F.conv2d(x, box_spread(self.weight) / 4, stride=2, padding=1)


class UpsamplingConv(nn.Module):
    """2x upsampling and a 3x3 conv, fused: a transposed conv with the box-spread kernel at stride 2.
    Its weight is [in, out, 3, 3], as transposed convolutions store it."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.weight = equalized_weight((in_channels, out_channels, 3, 3), in_channels * 9, SQRT2)

    def forward(self, x):
        return F.conv_transpose2d(x, box_spread(self.weight), stride=2, padding=1)


class Blur(nn.Module):
    """Depthwise [1, 2, 1] x [1, 2, 1] / 16 filter; the checkpoint stores the kernel."""

    def __init__(self, channels):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = taps[:, None] * taps[None, :] / 16
        self.register_buffer("weight", kernel.expand(channels, 1, 3, 3).clone())

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1, groups=x.shape[1])


class FromRGB(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.from_rgb = EqualizedConv(3, channels, 1, bias=True)

    def forward(self, x):
        return leaky_relu(self.from_rgb(x))


class ToRGB(nn.Module):
    """Loaded to match the checkpoint; features never go through it."""

    def __init__(self, channels):
        super().__init__()
        self.to_rgb = EqualizedConv(channels, 3, 1, bias=True, gain=0.03)


class EncodeBlock(nn.Module):
    """Halves the resolution; returns its output and its style contribution to the latent."""

    def __init__(self, in_channels, out_channels, latent_size, fused_scale):
        super().__init__()
        self.bias_1 = nn.Parameter(torch.zeros(1, in_channels, 1, 1))
        self.bias_2 = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.conv_1 = EqualizedConv(in_channels, in_channels, 3)
        self.blur = Blur(in_channels)
        self.conv_2 = (DownsamplingConv(in_channels, out_channels) if fused_scale
                       else EqualizedConv(in_channels, out_channels, 3))
        self.fused_scale = fused_scale
        self.style_1 = EqualizedLinear(2 * in_channels, latent_size)
        self.style_2 = EqualizedLinear(2 * out_channels, latent_size)

    def forward(self, x):
        x = leaky_relu(self.conv_1(x) + self.bias_1)
        style = self.style_1(channel_statistics(x))
        x = self.conv_2(self.blur(instance_norm(x, ENCODER_NORM_EPS)))
        if not self.fused_scale:
            x = F.avg_pool2d(x, 2)
        x = leaky_relu(x + self.bias_2)
        style = style + self.style_2(channel_statistics(x))
        return instance_norm(x, ENCODER_NORM_EPS), style


def encoder_widths(layer_count, start_channels, max_channels):
    """Input channels of encoder blocks 0..layer_count-1, then the last block's output channels."""
    return [min(max_channels, start_channels * 2 ** i) for i in range(layer_count + 1)]


def generator_widths(layer_count, start_channels, max_channels):
    """Output channels of generator blocks 0..layer_count-1 (block 0 works on the learnt constant, as wide)."""
    return [min(max_channels, start_channels * 2 ** (layer_count - 1 - i)) for i in range(layer_count)]


def block_resolution(index):
    """Side of generator block `index`'s output."""
    return 4 * 2 ** index


class ALAEEncoder(nn.Module):
    """EncoderDefault: image -> latent w [N, latent_size], at full resolution only. from_rgb holds one entry
    per level of detail (the release trained them progressively); full resolution uses from_rgb[0]."""

    def __init__(self, layer_count, start_channels, max_channels, latent_size):
        super().__init__()
        widths = encoder_widths(layer_count, start_channels, max_channels)
        self.resolution = 2 ** (layer_count + 1)
        self.from_rgb = nn.ModuleList(FromRGB(widths[i]) for i in range(layer_count))
        self.encode_block = nn.ModuleList(
            EncodeBlock(widths[i], widths[i + 1], latent_size, self.resolution // 2 ** i >= FUSED_SCALE_RESOLUTION)
            for i in range(layer_count))

    def forward(self, x):
        # FromRGB ends in a leaky ReLU and the original's encode() applies another one: both are kept.
        x = leaky_relu(self.from_rgb[0](x))
        latent = 0
        for block in self.encode_block:
            x, style = block(x)
            latent = latent + style
        return latent


class DecodeBlock(nn.Module):
    """Doubles the resolution (block 0 starts from the constant instead); two convs, each followed by noise,
    bias, leaky ReLU, instance norm and modulation by the latent."""

    def __init__(self, in_channels, out_channels, latent_size, first, fused_scale):
        super().__init__()
        self.noise_weight_1 = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.bias_1 = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.noise_weight_2 = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.bias_2 = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.first = first
        self.fused_scale = fused_scale
        if not first:
            self.conv_1 = (UpsamplingConv(in_channels, out_channels) if fused_scale
                           else EqualizedConv(in_channels, out_channels, 3))
        self.blur = Blur(out_channels)
        self.style_1 = EqualizedLinear(latent_size, 2 * out_channels, gain=1)
        self.conv_2 = EqualizedConv(out_channels, out_channels, 3)
        self.style_2 = EqualizedLinear(latent_size, 2 * out_channels, gain=1)

    def forward(self, x, latent, noise_1, noise_2):
        if not self.first:
            if not self.fused_scale:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = self.blur(self.conv_1(x))
        x = leaky_relu(x + self.noise_weight_1 * noise_1 + self.bias_1)
        x = modulate(instance_norm(x, GENERATOR_NORM_EPS), self.style_1(latent))
        x = leaky_relu(self.conv_2(x) + self.noise_weight_2 * noise_2 + self.bias_2)
        return modulate(instance_norm(x, GENERATOR_NORM_EPS), self.style_2(latent))


class ALAEGenerator(nn.Module):
    """GeneratorDefault, run from its learnt 4x4 constant up to a given block."""

    def __init__(self, layer_count, start_channels, max_channels, latent_size):
        super().__init__()
        widths = generator_widths(layer_count, start_channels, max_channels)
        self.const = nn.Parameter(torch.ones(1, widths[0], 4, 4))
        self.decode_block = nn.ModuleList(
            DecodeBlock(widths[max(i - 1, 0)], widths[i], latent_size, first=i == 0,
                        fused_scale=block_resolution(i) >= FUSED_SCALE_RESOLUTION)
            for i in range(layer_count))
        self.to_rgb = nn.ModuleList(ToRGB(w) for w in widths)

    def forward(self, latent, noise, last_block):
        """Outputs of blocks 0..last_block for latents [N, latent_size]; noise[i] is block i's pair of noise
        maps [N or 1, 1, side, side]."""
        x = self.const.expand(latent.shape[0], -1, -1, -1)
        outputs = []
        for block, (noise_1, noise_2) in zip(self.decode_block[:last_block + 1], noise):
            x = block(x, latent, noise_1, noise_2)
            outputs.append(x)
        return outputs


def build_alae(**arch):
    """(encoder, generator) of an ARCHITECTURES entry; their state_dict keys are the release's
    'discriminator_s' and 'generator_s'."""
    return ALAEEncoder(**arch), ALAEGenerator(**arch)


class _TrainingRecord:
    """What a loss-tracker object of the training code is read as: its pickled data, and nothing else."""


def read_alae_checkpoint(path: str) -> tuple:
    """(encoder state_dict, generator state_dict) of a release file {'models': {...}, 'auxiliary': {...}}."""
    stand_ins = [(_TrainingRecord, name) for name in TRAINING_RECORD_CLASSES]
    with torch.serialization.safe_globals(stand_ins):
        checkpoint = safe_load(path, "ALAE checkpoint")
    models = checkpoint.get("models") if isinstance(checkpoint, dict) else None
    expected = f"{{'models': {{{ENCODER_ENTRY!r}: state_dict, {GENERATOR_ENTRY!r}: state_dict, ...}}}}"
    if not isinstance(models, dict):
        found = f"keys {sorted(map(str, checkpoint))[:5]}" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"ALAE checkpoint {path!r} is not usable: expected {expected} as ALAE's "
                              f"Checkpointer saves it, found {found}")
    entries = []
    for name in (ENCODER_ENTRY, GENERATOR_ENTRY):
        state_dict = models.get(name)
        if not isinstance(state_dict, dict) or not state_dict or not all(
                isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise CheckpointError(f"ALAE checkpoint {path!r} is not usable: expected {expected}, but "
                                  f"'models' has no state_dict {name!r} (its entries: {sorted(map(str, models))})")
        entries.append(state_dict)
    return tuple(entries)


def fitting_configs(encoder_state: dict) -> list:
    """The alae_configs whose encoder has the file's number of blocks and stem width."""
    layers = len({k.split(".")[1] for k in encoder_state if k.startswith("encode_block.")})
    stem = encoder_state.get("from_rgb.0.from_rgb.weight")
    return [name for name, arch in ARCHITECTURES.items()
            if stem is not None and (arch["layer_count"], arch["start_channels"]) == (layers, stem.shape[0])]


def load_alae(encoder, generator, path: str, config_name: str) -> None:
    """Both models strictly from the file; a mismatch lists the entry's missing, unexpected and wrong-shape keys."""
    encoder_state, generator_state = read_alae_checkpoint(path)
    fits = fitting_configs(encoder_state)
    for model, state_dict, name in ((encoder, encoder_state, ENCODER_ENTRY),
                                    (generator, generator_state, GENERATOR_ENTRY)):
        report = mismatch_report(model.state_dict(), state_dict)
        if report:
            cause = (f"\n  probable cause: the file holds an alae_config {fits[0]!r} model, not {config_name!r}"
                     if fits and config_name not in fits else "")
            raise CheckpointError(f"ALAE checkpoint {path!r}: models[{name!r}] does not match alae_config "
                                  f"{config_name!r}:\n{report}{cause}")
        model.load_state_dict(state_dict, strict=True)


def feature_blocks(blocks: list, layer_count: int, image_side: int) -> list:
    """The generator blocks to read: `blocks`, or every block at most the image's resolution when empty."""
    readable = [i for i in range(layer_count) if block_resolution(i) <= image_side]
    if not blocks:
        if not readable:
            raise ValueError(f"ALAE's smallest block is 4x4, larger than the {image_side}x{image_side} images")
        return readable
    for b in blocks:
        if not 0 <= b < layer_count:
            raise ValueError(f"block {b} does not exist: the generator has blocks 0-{layer_count - 1}")
        if b not in readable:
            raise ValueError(f"block {b} works at {block_resolution(b)}x{block_resolution(b)}, above the "
                             f"{image_side}x{image_side} images (dim); read blocks 0-{readable[-1]}")
    return list(blocks)


def shared_noise_maps(seed: int, last_block: int) -> list:
    """One set of noise maps for every image: per block, two [1, 1, side, side] maps, drawn on the CPU from
    `seed` in block order (so a set for fewer blocks is a prefix of a longer one)."""
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(1, 1, side, side, generator=generator) for _ in range(2))
            for side in map(block_resolution, range(last_block + 1))]


def per_image_noise_maps(seed: int, image: np.ndarray, last_block: int, device) -> list:
    """Each image's own noise maps [N, 1, side, side], drawn from (seed, its pixels): the same image always gets
    the same noise, whatever batch it comes in."""
    return [tuple(image_noise(seed, image, 0, 2 * i + j, (1, side, side), device) for j in range(2))
            for i, side in enumerate(map(block_resolution, range(last_block + 1)))]


def resize_to_encoder(x, resolution: int):
    """[-1, 1] images to the encoder's square resolution: bilinear upsampling, or averaging down (the original
    average-pools larger images)."""
    if x.shape[-1] < resolution:
        return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(x, resolution)


class ALAEFeatureExtractor:
    def __init__(self, encoder: ALAEEncoder, generator: ALAEGenerator, blocks: list, seed: int, share_noise: bool):
        self.encoder = encoder
        self.generator = generator
        self.blocks = blocks
        self.seed = seed
        dtype = generator.const.dtype
        self.noise = None if not share_noise else [
            tuple(m.to(self.device, dtype) for m in pair) for pair in shared_noise_maps(seed, max(blocks))]

    @property
    def device(self):
        return self.generator.const.device

    @torch.no_grad()
    def __call__(self, image: np.ndarray, view: int = 0) -> list:
        """uint8 [H, W, 3] -> one map [C, 4 * 2^b, 4 * 2^b] per block b read; [N, H, W, 3] -> the same maps with
        a leading batch dimension. The view does not matter: noise depends on the seed (and pixels) only."""
        dtype = self.generator.const.dtype
        x = resize_to_encoder(image_tensor(image, self.device, "symmetric"), self.encoder.resolution)
        latent = self.encoder(x.to(dtype))
        noise = self.noise or [tuple(m.to(dtype) for m in pair) for pair in
                               per_image_noise_maps(self.seed, image, max(self.blocks), self.device)]
        outputs = self.generator(latent, noise, max(self.blocks))
        return batch_result(image, [outputs[b] for b in self.blocks])


def check_config(cfg: dict, path: str) -> None:
    name = cfg["alae_config"]
    if name not in ARCHITECTURES:
        raise ValueError(f"{path}: 'alae_config' must be one of {sorted(ARCHITECTURES)}, got {name!r}")
    if cfg["input_activations"]:
        raise ValueError(f"{path}: input_activations is not supported for model_type 'alae': a block's input is "
                         "the previous block's output, so list that block instead")
    height, width = cfg["dim"][:2]
    if height != width:
        raise ValueError(f"{path}: ALAE encodes square images; dim {cfg['dim'][:2]} is not square")
    try:
        feature_blocks(cfg["blocks"], ARCHITECTURES[name]["layer_count"], width)
    except ValueError as e:
        raise ValueError(f"{path}: alae_config {name!r}: {e}") from None


# alae_config: which released architecture (configs/<name>.yaml) the checkpoint is.
@register("alae", config_keys={"alae_config": (str, True)}, check_config=check_config)
def build_alae_extractor(cfg, model_flags, device, seed, random_init, dtype):
    arch = ARCHITECTURES[cfg.backbone_options["alae_config"]]
    blocks = feature_blocks(cfg.blocks, arch["layer_count"], cfg.dim[1])
    if random_init:
        torch.manual_seed(seed)
    encoder, generator = build_alae(**arch)
    if not random_init:
        load_alae(encoder, generator, cfg.model_path, cfg.backbone_options["alae_config"])
    for model in (encoder, generator):
        model.to(device, dtype).eval()
    return ALAEFeatureExtractor(encoder, generator, blocks, seed, cfg.share_noise)
