"""StyleGAN2's generator and its public checkpoints, shared by the GAN Inversion and GAN Encoder backbones
(gan_inversion.py, gan_encoder.py), whose features are this generator's activations for an image's latent.

- StyleGAN2's generator (config F, "skip" architecture) in plain PyTorch: the mapping network, and the synthesis
  network of modulated/demodulated 3x3 convolutions, upsampling by a transposed convolution followed by the
  [1, 3, 3, 1] low-pass filter, constant noise inputs (noise_mode 'const') and skip ToRGB outputs. Its
  state_dict keys are those of StyleGAN2-ADA's `G_ema` (mapping.fc0..., synthesis.b4.const, ...).
- A loader for the public files, never executing what they carry (see `ddpm_seg.safe_pickle`): NVIDIA's
  StyleGAN2 TensorFlow pickles (stylegan2-<ffhq|cat|horse|church|car>-config-f.pkl, tuples (G, D, Gs) of which
  Gs is read), StyleGAN2-ADA PyTorch pickles (dicts whose G_ema is read), and our own converted file
  (`save_generator`: {'arguments': ..., 'state_dict': ...} written by torch.save, read with weights_only).
  Every format is converted to this module's state_dict and loaded strictly.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.checkpoint import CheckpointError, load_state_dict_strict, safe_load

from .. import safe_pickle

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


def build_generator(cfg, seed: int, random_init: bool) -> StyleGAN2Generator:
    """A backbone's generator: the file model_path, or (--random_init) the architecture its config key `generator`
    names, seeded."""
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
