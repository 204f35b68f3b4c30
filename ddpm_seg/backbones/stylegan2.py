"""StyleGAN2 generator, its public checkpoints, and GAN Inversion features (a baseline of the paper).

What the paper specifies: its GAN Inversion baseline maps each image into the latent space of a StyleGAN2
trained on the dataset's domain by optimisation, and reads the generator's activations for that latent as the
pixel features; its main text gives neither the inversion's settings nor which activations are read. This
file follows StyleGAN2's own projector (Karras et al. 2020) and reads synthesis block outputs, configurably.

What this file builds:

- StyleGAN2's generator (config F, "skip" architecture) in plain PyTorch: the mapping network, and the synthesis
  network of modulated/demodulated 3x3 convolutions, upsampling by a transposed convolution followed by the
  [1, 3, 3, 1] low-pass filter, constant noise inputs (noise_mode 'const') and skip ToRGB outputs. Its
  state_dict keys are those of StyleGAN2-ADA's `G_ema` (mapping.fc0..., synthesis.b4.const, ...).
- A loader for the public files, never executing what they carry (see `ddpm_seg.safe_pickle`): NVIDIA's
  StyleGAN2 TensorFlow pickles (stylegan2-<ffhq|cat|horse|church|car>-config-f.pkl, tuples (G, D, Gs) of which
  Gs is read), StyleGAN2-ADA PyTorch pickles (dicts whose G_ema is read), and our own converted file
  (`save_generator`: {'arguments': ..., 'state_dict': ...} written by torch.save, read with weights_only).
  Every format is converted to this module's state_dict and loaded strictly.
- The `gan_inversion` backbone: each image is projected as StyleGAN2's projector does: Adam from w_avg for
  `inversion_steps` (1000) at `inversion_lr` (0.1) with its ramps, latent noise decaying over the first 3/4 of
  the steps, per-image noise maps optimised under its regularisation (`optimize_noise`), and the LPIPS-VGG16
  distance (`perceptual_loss` 'lpips'; 'mse' is the cheap alternative) of the generated image, downsampled to
  the input's size (at most 256), to the image. `latent_space` 'w' optimises one w (the projector's), 'w+' one
  per layer. The features are the synthesis block outputs at the resolutions listed in `blocks`, ascending,
  with min(32768 / r, 512) channels each (2944 for 4..256), for the inverted latent and the image's noise maps.
  Randomness (noise maps, latent noise) is drawn from the builder's seed and the image's pixels, so an image
  always gets the same features. The optimisation runs in float32; the final block outputs in `dtype`.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.checkpoint import CheckpointError, load_state_dict_strict, safe_load

from .. import safe_pickle
from ..lpips import load_lpips
from . import batch_result, image_noise, image_tensor, register

# Generator arguments of the public StyleGAN2 config-F networks (NVlabs/stylegan2, run_training.py config-f:
# fmap_base 16 << 10, i.e. channel_base 32768 in StyleGAN2-ADA's terms; 8 mapping layers, mapping lr 0.01).
CONFIG_F = dict(z_dim=512, w_dim=512, mapping_layers=8, mapping_lr_multiplier=0.01, channel_base=32768,
                channel_max=512, conv_clamp=None, resample_filter=(1, 3, 3, 1))
ARCHITECTURES = {
    "stylegan2-ffhq-config-f": dict(CONFIG_F, img_resolution=1024),
    "stylegan2-cat-config-f": dict(CONFIG_F, img_resolution=256),
    "stylegan2-horse-config-f": dict(CONFIG_F, img_resolution=256),
    "stylegan2-church-config-f": dict(CONFIG_F, img_resolution=256),
    "stylegan2-car-config-f": dict(CONFIG_F, img_resolution=512),
}
GENERATOR_ARGUMENTS = ("z_dim", "w_dim", "img_resolution", "mapping_layers", "mapping_lr_multiplier",
                       "channel_base", "channel_max", "conv_clamp", "resample_filter")
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2)


def setup_filter(taps) -> torch.Tensor:
    """The separable low-pass filter as a 2D kernel [k, k] normalised to sum 1 (StyleGAN2-ADA's setup_filter)."""
    taps = torch.as_tensor(taps, dtype=torch.float32)
    kernel = torch.outer(taps, taps)
    return kernel / kernel.sum()


def blur(x: torch.Tensor, kernel: torch.Tensor, pad0: int, pad1: int, gain: float) -> torch.Tensor:
    """Pad (pad0 before, pad1 after, both axes) and convolve every channel with `kernel` times `gain`."""
    channels = x.shape[1]
    weight = (kernel * gain).flip([0, 1]).to(x.dtype)[None, None].expand(channels, 1, *kernel.shape)
    return F.conv2d(F.pad(x, [pad0, pad1, pad0, pad1]), weight, groups=channels)


def upsample2x(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """2x upsampling by zero insertion then the low-pass filter (gain 4), as upfirdn2d.upsample2d."""
    n, c, h, w = x.shape
    zeros = x.new_zeros(n, c, h, 2, w, 2)
    zeros[:, :, :, 0, :, 0] = x
    k = kernel.shape[0]
    return blur(zeros.reshape(n, c, 2 * h, 2 * w), kernel, (k + 1) // 2, (k - 2) // 2, gain=4)


def lrelu_bias(x: torch.Tensor, bias: torch.Tensor, clamp) -> torch.Tensor:
    """StyleGAN2's bias_act for 'lrelu': add bias, leaky ReLU 0.2, times sqrt(2), clamp to +-clamp."""
    x = F.leaky_relu(x + bias.to(x.dtype)[None, :, None, None], LRELU_SLOPE) * LRELU_GAIN
    return x.clamp(-clamp, clamp) if clamp is not None else x


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalised learning rate: weights are stored unscaled and multiplied by
    lr_multiplier / sqrt(fan_in) at run time (bias by lr_multiplier)."""

    def __init__(self, in_features, out_features, activation=False, lr_multiplier=1.0, bias_init=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.activation = activation
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x):
        x = F.linear(x, self.weight.to(x.dtype) * self.weight_gain, self.bias.to(x.dtype) * self.bias_gain)
        return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN if self.activation else x


class MappingNetwork(nn.Module):
    """z -> w: normalise z to unit second moment, then `num_layers` lrelu layers; w_avg is the tracked mean of w
    (the truncation centre and the projector's starting point)."""

    def __init__(self, z_dim, w_dim, num_ws, num_layers, lr_multiplier):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.num_layers = z_dim, w_dim, num_ws, num_layers
        for i in range(num_layers):
            layer = FullyConnectedLayer(z_dim if i == 0 else w_dim, w_dim, activation=True, lr_multiplier=lr_multiplier)
            setattr(self, f"fc{i}", layer)
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z, truncation_psi=1.0):
        """z [N, z_dim] -> ws [N, num_ws, w_dim], truncated towards w_avg by truncation_psi."""
        x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if truncation_psi != 1:
            x = self.w_avg.to(x.dtype).lerp(x, truncation_psi)
        return x[:, None].repeat(1, self.num_ws, 1)


def modulated_conv2d(x, weight, styles, demodulate=True, up=False, kernel=None):
    """Per-sample convolution with the weight scaled by each sample's styles (per input channel) and, with
    `demodulate`, normalised to unit norm per output channel; run as one grouped convolution over the batch.

    up: 2x upsampling as StyleGAN2 does it, a stride-2 transposed convolution followed by the low-pass `kernel`
    (gain 4); otherwise a same-padded convolution."""
    n, in_channels, h, w = x.shape
    out_channels, _, k, _ = weight.shape
    weights = weight.to(x.dtype)[None] * styles.to(x.dtype)[:, None, :, None, None]  # [N, O, I, k, k]
    if demodulate:
        weights = weights * (weights.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).rsqrt()
    x = x.reshape(1, n * in_channels, h, w)
    if up:
        # conv_transpose2d takes [in, out/groups, k, k] per group.
        weights = weights.transpose(1, 2).reshape(n * in_channels, out_channels, k, k)
        x = F.conv_transpose2d(x, weights, stride=2, groups=n)
        x = blur(x, kernel, 1, 1, gain=4)
    else:
        x = F.conv2d(x, weights.reshape(n * out_channels, in_channels, k, k), padding=k // 2, groups=n)
    return x.reshape(n, out_channels, *x.shape[2:])


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution (2x upsampling with `up`), constant noise, bias, leaky ReLU."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, up, resample_filter, conv_clamp):
        super().__init__()
        self.up, self.conv_clamp = up, conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))

    def forward(self, x, w, noise=None):
        """noise: [N, 1, r, r] maps replacing the stored constant noise (the projector optimises them)."""
        x = modulated_conv2d(x, self.weight, self.affine(w), up=self.up, kernel=self.resample_filter)
        x = x + ((self.noise_const if noise is None else noise) * self.noise_strength).to(x.dtype)
        return lrelu_bias(x, self.bias, self.conv_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution to RGB, without demodulation."""

    def __init__(self, in_channels, w_dim, conv_clamp):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(3, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros([3]))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x, w):
        x = modulated_conv2d(x, self.weight, self.affine(w) * self.weight_gain, demodulate=False)
        x = x + self.bias.to(x.dtype)[None, :, None, None]
        return x.clamp(-self.conv_clamp, self.conv_clamp) if self.conv_clamp is not None else x


class SynthesisBlock(nn.Module):
    """One resolution: (the learned constant at 4x4, else an upsampling conv0) then conv1, and a ToRGB output
    added to the upsampled image of the previous blocks ('skip' architecture)."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, resample_filter, conv_clamp):
        super().__init__()
        self.resolution = resolution
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, True, resample_filter,
                                        conv_clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, False, resample_filter,
                                    conv_clamp)
        self.torgb = ToRGBLayer(out_channels, w_dim, conv_clamp)
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 1 if in_channels == 0 else 2

    def layers(self) -> list:
        return [self.conv1] if self.num_conv == 1 else [self.conv0, self.conv1]

    def forward(self, x, image, ws, noise=(None, None)):
        """ws [N, num_conv + 1, w_dim]: one per convolution, then the ToRGB's (the next block's first);
        noise: one map or None (the stored constant) per convolution."""
        if x is None:
            x = self.const.to(ws.dtype)[None].repeat(ws.shape[0], 1, 1, 1)
        else:
            x = self.conv0(x, ws[:, 0], noise[0])
        x = self.conv1(x, ws[:, self.num_conv - 1], noise[self.num_conv - 1])
        rgb = self.torgb(x, ws[:, self.num_conv])
        image = rgb if image is None else upsample2x(image, self.resample_filter) + rgb
        return x, image


class SynthesisNetwork(nn.Module):
    """ws -> image, through blocks b4, b8, ..., b<img_resolution> of min(channel_base / r, channel_max)
    channels; num_ws = 2 * log2(resolution) - 2 (one per convolution, plus the last ToRGB's)."""

    def __init__(self, w_dim, img_resolution, channel_base, channel_max, resample_filter, conv_clamp):
        super().__init__()
        log2 = int(math.log2(img_resolution))
        if img_resolution < 4 or 2**log2 != img_resolution:
            raise ValueError(f"StyleGAN2's resolution must be a power of two >= 4, got {img_resolution}")
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        channels = {r: min(channel_base // r, channel_max) for r in self.block_resolutions}
        for r in self.block_resolutions:
            setattr(self, f"b{r}", SynthesisBlock(channels[r // 2] if r > 4 else 0, channels[r], w_dim, r,
                                                  resample_filter, conv_clamp))
        self.num_ws = 2 * log2 - 2
        self.channels = channels

    def layers(self) -> list:
        """The synthesis layers (modulated 3x3 convolutions) in order, each with its noise input."""
        return [layer for r in self.block_resolutions for layer in getattr(self, f"b{r}").layers()]

    def forward(self, ws, read=(), noise=None):
        """ws [N, num_ws, w_dim] -> (image [N, 3, R, R], [block output [N, C, r, r] for r in `read`, ascending]).
        noise: None (the stored constant noise), or one [N, 1, r, r] map per layer of layers()."""
        layer_noise = iter(noise if noise is not None else [None] * len(self.layers()))
        unknown = sorted(set(read) - set(self.block_resolutions))
        if unknown:
            raise ValueError(f"no synthesis block at resolution(s) {unknown}; blocks: {self.block_resolutions}")
        x = image = None
        maps, w_index = [], 0
        for r in self.block_resolutions:
            block = getattr(self, f"b{r}")
            noise_maps = [next(layer_noise) for _ in range(block.num_conv)]
            x, image = block(x, image, ws[:, w_index:w_index + block.num_conv + 1], noise_maps)
            w_index += block.num_conv
            if r in read:
                maps.append(x)
        return image, maps


class StyleGAN2Generator(nn.Module):
    """StyleGAN2 generator: `mapping(z, truncation_psi)` -> ws, `synthesis(ws, read)` -> (image, maps)."""

    def __init__(self, z_dim, w_dim, img_resolution, mapping_layers, mapping_lr_multiplier, channel_base,
                 channel_max, conv_clamp, resample_filter):
        super().__init__()
        self.arguments = dict(z_dim=z_dim, w_dim=w_dim, img_resolution=img_resolution, mapping_layers=mapping_layers,
                              mapping_lr_multiplier=mapping_lr_multiplier, channel_base=channel_base,
                              channel_max=channel_max, conv_clamp=conv_clamp,
                              resample_filter=tuple(resample_filter))
        self.z_dim, self.w_dim, self.img_resolution = z_dim, w_dim, img_resolution
        # Registered before mapping, as StyleGAN2-ADA does: the state_dict lists synthesis first.
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, channel_base, channel_max, resample_filter,
                                          conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, w_dim, self.num_ws, mapping_layers, mapping_lr_multiplier)

    @property
    def w_avg(self) -> torch.Tensor:
        return self.mapping.w_avg

    def forward(self, z, truncation_psi=1.0):
        return self.synthesis(self.mapping(z, truncation_psi))[0]


def create_generator(name_or_arguments, device=None) -> StyleGAN2Generator:
    """A randomly initialised generator (seed torch before calling): a name of ARCHITECTURES or its arguments."""
    if isinstance(name_or_arguments, str):
        if name_or_arguments not in ARCHITECTURES:
            raise ValueError(f"unknown StyleGAN2 architecture {name_or_arguments!r}; known: {sorted(ARCHITECTURES)}")
        name_or_arguments = ARCHITECTURES[name_or_arguments]
    arguments = dict(name_or_arguments)
    missing = sorted(set(GENERATOR_ARGUMENTS) - set(arguments))
    unknown = sorted(set(arguments) - set(GENERATOR_ARGUMENTS))
    if missing or unknown:
        raise ValueError(f"StyleGAN2 generator arguments: missing {missing}, unknown {unknown}")
    if device is None:
        return StyleGAN2Generator(**arguments)
    with torch.device(device):
        return StyleGAN2Generator(**arguments)


# ---------------------------------------------------------------------------------------------- file formats

TF_UNUSED_VARIABLES = ("lod",)  # G_main's progressive-growing level of detail, always 0 in StyleGAN2
TF_KNOWN_KWARGS = ("latent_size", "label_size", "dlatent_size", "resolution", "num_channels", "mapping_layers",
                   "mapping_fmaps", "label_fmaps", "mapping_nonlinearity", "mapping_lrmul", "w_avg_beta",
                   "fmap_base", "fmap_max", "num_fp16_res", "conv_clamp", "architecture", "resample_kernel",
                   "use_noise", "nonlinearity", "truncation_psi", "truncation_cutoff", "style_mixing_prob",
                   "structure", "fmap_min", "fmap_decay", "dtype", "randomize_noise", "fused_modconv",
                   "is_template_graph", "components", "func_name", "synthesis_func", "mapping_func")


def check_supported(path: str, found: dict) -> None:
    """Refuse generator settings this module does not build: {setting: (value, supported value)}."""
    for setting, (value, supported) in found.items():
        if value != supported:
            raise CheckpointError(f"{path!r}: StyleGAN2 generator with {setting}={value!r} is not supported "
                                  f"(this loader builds config-F generators: {setting}={supported!r})")


def tf_arguments(path: str, static_kwargs: dict) -> dict:
    """Generator arguments from a TF Gs network's static_kwargs (defaults as NVlabs/stylegan2's G_main,
    G_mapping and G_synthesis_stylegan2 define them)."""
    unknown = sorted(set(static_kwargs) - set(TF_KNOWN_KWARGS))
    if unknown:
        raise CheckpointError(f"{path!r}: unknown StyleGAN2 TensorFlow generator kwargs {unknown}")
    kw = dict(static_kwargs)
    w_dim = kw.get("dlatent_size", 512)
    check_supported(path, {
        "label_size": (kw.get("label_size", 0), 0), "num_channels": (kw.get("num_channels", 3), 3),
        "architecture": (kw.get("architecture", "skip"), "skip"),
        "nonlinearity": (kw.get("nonlinearity", "lrelu"), "lrelu"),
        "mapping_nonlinearity": (kw.get("mapping_nonlinearity", "lrelu"), "lrelu"),
        "mapping_fmaps": (kw.get("mapping_fmaps") or w_dim, w_dim), "use_noise": (kw.get("use_noise", True), True),
        "fmap_decay": (kw.get("fmap_decay", 1.0), 1.0), "fmap_min": (kw.get("fmap_min", 1), 1)})
    return dict(z_dim=kw.get("latent_size", 512), w_dim=w_dim, img_resolution=kw.get("resolution", 1024),
                mapping_layers=kw.get("mapping_layers", 8), mapping_lr_multiplier=kw.get("mapping_lrmul", 0.01),
                channel_base=kw.get("fmap_base", 16 << 10) * 2, channel_max=kw.get("fmap_max", 512),
                conv_clamp=kw.get("conv_clamp"), resample_filter=tuple(kw.get("resample_kernel") or (1, 3, 3, 1)))


def tf_variables(network: safe_pickle.TFNetworkState, prefix: str = "") -> dict:
    """{'component/.../name': array} of a TF network and its components (legacy.py's naming)."""
    variables = {prefix + name: np.asarray(value) for name, value in network.state.get("variables", [])}
    for name, component in network.state.get("components", {}).items():
        if not isinstance(component, safe_pickle.TFNetworkState):
            raise CheckpointError(f"TF network component {name!r} is a {type(component).__name__}, not a network")
        variables.update(tf_variables(component, prefix + name + "/"))
    return variables


def tf_variable_names(arguments: dict) -> dict:
    """Our state_dict key -> (TF variable name, conversion) for a TF config-F Gs; conversions: 'T' (dense
    [in, out] -> [out, in]), 'conv' ([k, k, in, out] -> [out, in, k, k]), 'conv_flip' (the same, spatially
    flipped: TF's upsampling conv is a transposed convolution), 'const' (drop the batch axis), 'noise'
    ([1, 1, r, r] -> [r, r]), 'mod_bias' (TF adds 1 at run time), '' (as is)."""
    names = {"mapping.w_avg": ("dlatent_avg", "")}
    for i in range(arguments["mapping_layers"]):
        names[f"mapping.fc{i}.weight"] = (f"mapping/Dense{i}/weight", "T")
        names[f"mapping.fc{i}.bias"] = (f"mapping/Dense{i}/bias", "")
    log2 = int(math.log2(arguments["img_resolution"]))
    for r in (2**i for i in range(2, log2 + 1)):
        block, scope = f"synthesis.b{r}", f"synthesis/{r}x{r}"
        layers = {"conv1": ("Conv", 0)} if r == 4 else {"conv0": ("Conv0_up", 2 * int(math.log2(r)) - 5),
                                                         "conv1": ("Conv1", 2 * int(math.log2(r)) - 4)}
        if r == 4:
            names[f"{block}.const"] = (f"{scope}/Const/const", "const")
        for layer, (tf_layer, noise_index) in layers.items():
            conv = "conv_flip" if layer == "conv0" else "conv"
            names[f"{block}.{layer}.weight"] = (f"{scope}/{tf_layer}/weight", conv)
            names[f"{block}.{layer}.bias"] = (f"{scope}/{tf_layer}/bias", "")
            names[f"{block}.{layer}.noise_strength"] = (f"{scope}/{tf_layer}/noise_strength", "")
            names[f"{block}.{layer}.noise_const"] = (f"synthesis/noise{noise_index}", "noise")
            names[f"{block}.{layer}.affine.weight"] = (f"{scope}/{tf_layer}/mod_weight", "T")
            names[f"{block}.{layer}.affine.bias"] = (f"{scope}/{tf_layer}/mod_bias", "mod_bias")
        names[f"{block}.torgb.weight"] = (f"{scope}/ToRGB/weight", "conv")
        names[f"{block}.torgb.bias"] = (f"{scope}/ToRGB/bias", "")
        names[f"{block}.torgb.affine.weight"] = (f"{scope}/ToRGB/mod_weight", "T")
        names[f"{block}.torgb.affine.bias"] = (f"{scope}/ToRGB/mod_bias", "mod_bias")
    return names


TF_CONVERSIONS = {
    "": lambda a: a,
    "T": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
    "conv_flip": lambda a: a[::-1, ::-1].transpose(3, 2, 0, 1),
    "const": lambda a: a[0],
    "noise": lambda a: a[0, 0],
    "mod_bias": lambda a: a + 1,
}


def convert_tf_generator(path: str, gs: safe_pickle.TFNetworkState):
    """(arguments, state_dict) of a TF Gs network; every TF variable must be used (resample filters, which TF
    does not store, come from the kwargs)."""
    if gs.state.get("version", 0) < 4:
        raise CheckpointError(f"{path!r}: TensorFlow network pickle version {gs.state.get('version')} is too old "
                              "(StyleGAN2 networks are version 4)")
    arguments = tf_arguments(path, gs.state.get("static_kwargs", {}))
    variables = tf_variables(gs)
    names = tf_variable_names(arguments)
    missing = sorted(tf for tf, _ in names.values() if tf not in variables)
    unused = sorted(set(variables) - {tf for tf, _ in names.values()} - set(TF_UNUSED_VARIABLES))
    if missing or unused:
        raise CheckpointError(f"{path!r} does not hold a StyleGAN2 config-F generator (Gs): missing TF variables "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                              f"{unused[:5]}{' ...' if len(unused) > 5 else ''}")
    state_dict = {key: torch.from_numpy(np.array(TF_CONVERSIONS[how](variables[tf]), np.float32))
                  for key, (tf, how) in names.items()}
    kernel = setup_filter(arguments["resample_filter"])
    for key, value in create_generator(arguments, "meta").state_dict().items():
        if key.endswith("resample_filter"):
            state_dict[key] = kernel.clone()
    return arguments, state_dict


ADA_DEFAULTS = dict(mapping=dict(num_layers=8, lr_multiplier=0.01, activation="lrelu", layer_features=None,
                                 embed_features=None, w_avg_beta=0.995),
                    synthesis=dict(channel_base=32768, channel_max=512, conv_clamp=None, architecture="skip",
                                   resample_filter=[1, 3, 3, 1], use_noise=True, activation="lrelu",
                                   num_fp16_res=0, fp16_channels_last=False))


def ada_arguments(path: str, init_kwargs: dict) -> dict:
    """Generator arguments from a StyleGAN2-ADA Generator's init kwargs (defaults of training/networks.py)."""
    mapping = {**ADA_DEFAULTS["mapping"], **dict(init_kwargs.get("mapping_kwargs", {}))}
    synthesis = {**ADA_DEFAULTS["synthesis"], **dict(init_kwargs.get("synthesis_kwargs", {}))}
    w_dim = init_kwargs.get("w_dim", 512)
    unknown = sorted(set(mapping) - set(ADA_DEFAULTS["mapping"])) + sorted(
        set(synthesis) - set(ADA_DEFAULTS["synthesis"]))
    if unknown:
        raise CheckpointError(f"{path!r}: unknown StyleGAN2-ADA generator kwargs {unknown}")
    check_supported(path, {
        "c_dim": (init_kwargs.get("c_dim", 0), 0), "img_channels": (init_kwargs.get("img_channels", 3), 3),
        "architecture": (synthesis["architecture"], "skip"), "activation": (synthesis["activation"], "lrelu"),
        "mapping activation": (mapping["activation"], "lrelu"), "use_noise": (synthesis["use_noise"], True),
        "mapping layer_features": (mapping["layer_features"] or w_dim, w_dim)})
    # num_fp16_res only chooses the precision the original runs in; the computing dtype is the caller's here.
    return dict(z_dim=init_kwargs.get("z_dim", 512), w_dim=w_dim, img_resolution=init_kwargs["img_resolution"],
                mapping_layers=mapping["num_layers"], mapping_lr_multiplier=mapping["lr_multiplier"],
                channel_base=synthesis["channel_base"], channel_max=synthesis["channel_max"],
                conv_clamp=synthesis["conv_clamp"], resample_filter=tuple(synthesis["resample_filter"]))


def persistent_state_dict(module: safe_pickle.PersistentObject, prefix: str = "") -> dict:
    """The state_dict of a pickled torch module: its _parameters and persistent _buffers, then its _modules'."""
    state = module.state
    tensors = dict(state.get("_parameters", {}))
    skipped = set(state.get("_non_persistent_buffers_set", ()))
    tensors.update({k: v for k, v in state.get("_buffers", {}).items() if k not in skipped})
    state_dict = {prefix + k: v.detach().clone() for k, v in tensors.items() if v is not None}
    for name, child in state.get("_modules", {}).items():
        if child is None:
            continue
        if not isinstance(child, safe_pickle.PersistentObject):
            raise CheckpointError(f"module {prefix + name!r} is a {type(child).__name__}, not a persistent module")
        state_dict.update(persistent_state_dict(child, f"{prefix}{name}."))
    return state_dict


def convert_ada_generator(path: str, g_ema: safe_pickle.PersistentObject):
    """(arguments, state_dict) of a StyleGAN2-ADA G_ema."""
    if g_ema.class_name != "Generator":
        raise CheckpointError(f"{path!r}: G_ema is a {g_ema.class_name!r}, not a StyleGAN2-ADA Generator")
    init_kwargs = g_ema.state.get("_init_kwargs")
    if not isinstance(init_kwargs, dict) or "img_resolution" not in init_kwargs:
        raise CheckpointError(f"{path!r}: G_ema carries no init kwargs with img_resolution")
    return ada_arguments(path, init_kwargs), persistent_state_dict(g_ema)


def read_generator_file(path: str):
    """(arguments, state_dict) of a generator file in any supported format (see the module docstring)."""
    if not safe_pickle.is_pickle(path):
        saved = safe_load(path, "StyleGAN2 generator")
        if not (isinstance(saved, dict) and isinstance(saved.get("arguments"), dict)
                and isinstance(saved.get("state_dict"), dict)):
            raise CheckpointError(f"StyleGAN2 generator {path!r} is not usable: a torch file must hold "
                                  "{'arguments': ..., 'state_dict': ...} as save_generator writes it")
        arguments = dict(saved["arguments"])
        arguments["resample_filter"] = tuple(arguments.get("resample_filter", ()))
        return arguments, saved["state_dict"]
    data = safe_pickle.load_pickle(path, "StyleGAN2 network pickle")
    if isinstance(data, tuple) and len(data) == 3 and all(isinstance(n, safe_pickle.TFNetworkState) for n in data):
        return convert_tf_generator(path, data[2])
    if isinstance(data, dict) and isinstance(data.get("G_ema"), safe_pickle.PersistentObject):
        return convert_ada_generator(path, data["G_ema"])
    found = f"a dict with keys {sorted(map(str, data))[:6]}" if isinstance(data, dict) else type(data).__name__
    raise CheckpointError(f"StyleGAN2 network pickle {path!r} holds {found}; expected a TensorFlow (G, D, Gs) "
                          "tuple or a StyleGAN2-ADA dict with G_ema")


def load_generator(path: str, device=None) -> StyleGAN2Generator:
    """The generator of a public StyleGAN2 file or a save_generator file, loaded strictly, in eval mode."""
    arguments, state_dict = read_generator_file(path)
    try:
        generator = create_generator(arguments)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path!r}: unusable generator arguments {arguments}: {e}") from None
    not_float = sorted(k for k, v in state_dict.items() if not (torch.is_tensor(v) and v.is_floating_point()))
    if not_float:
        raise CheckpointError(f"{path!r}: entries {not_float[:5]} are not floating-point tensors")
    load_state_dict_strict(generator, state_dict, path, hints=None)
    return generator.to(device or "cpu").eval().requires_grad_(False)


def save_generator(generator: StyleGAN2Generator, path: str) -> None:
    """Write `generator` as {'arguments', 'state_dict'}, which load_generator reads with weights_only."""
    arguments = dict(generator.arguments, resample_filter=list(generator.arguments["resample_filter"]))
    torch.save({"arguments": arguments, "state_dict": generator.state_dict()}, path)


# ------------------------------------------------------------------------------------------- GAN Inversion

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
    if cfg["steps"]:
        raise ValueError(f"{path}: 'steps' must be [] for gan_inversion (no diffusion steps), got {cfg['steps']}")
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


def build_inversion_generator(cfg, seed: int, random_init: bool) -> StyleGAN2Generator:
    """The generator of model_path, or (--random_init) the architecture `generator` names, seeded."""
    name = cfg.backbone_options.get("generator")
    if random_init:
        if name is None:
            raise ValueError(f"--random_init needs 'generator', the name of a StyleGAN2 architecture "
                             f"({sorted(ARCHITECTURES)})")
        torch.manual_seed(seed)
        return create_generator(name).eval().requires_grad_(False)
    generator = load_generator(cfg.model_path)
    if name is not None and generator.img_resolution != ARCHITECTURES[name]["img_resolution"]:
        raise CheckpointError(f"StyleGAN2 generator {cfg.model_path!r} is {generator.img_resolution}x"
                              f"{generator.img_resolution}, not a {name} generator ('generator' in the config)")
    return generator


@register("gan_inversion", config_keys=INVERSION_CONFIG_KEYS, check_config=check_inversion_config)
def build_gan_inversion(cfg, model_flags, device, seed, random_init, dtype):
    options = {**INVERSION_DEFAULTS, **cfg.backbone_options}
    generator = build_inversion_generator(cfg, seed, random_init)
    perceptual = None
    if options["perceptual_loss"] == "lpips":
        perceptual = load_lpips(options["perceptual_vgg16_path"], options["perceptual_lpips_path"]).to(device)
    # The projection runs in float32 (Adam on bf16/fp16 latents would stall); `dtype` computes the features.
    generator.to(device)
    return GANInversionFeatures(generator, perceptual, cfg.blocks, options, seed, dtype)
