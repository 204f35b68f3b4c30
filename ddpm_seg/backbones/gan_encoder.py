"""GAN Encoder features: a StyleGAN2 inversion encoder (e4e, "Designing an Encoder for StyleGAN Image
Manipulation", Tov et al. 2021) maps the image to W+, and the features are read from there.

The paper's GAN Inversion baseline (backbone gan_inversion) finds each image's latent by optimisation; its
GAN Encoder baseline takes the latent from a pretrained inversion encoder instead. Two readings of the
encoded image are built, chosen by the config key `features`:

- "generator" (default): the StyleGAN2 generator's activations for the encoded latent. The image is encoded
  to W+ codes [num_ws, w_dim], e4e's latent_avg is added as e4e does, and the synthesis network runs on the
  codes; `blocks` lists the generator resolutions read (each synthesis block's output, ascending).
  `encoder_path` is the e4e checkpoint, `model_path` the generator (NVIDIA's official config-f pickle, which
  e4e's decoder was converted from, or a stylegan2.save_generator file), `generator` the name of its
  architecture (checked against the file; what --random_init builds).
- "encoder": the encoder's own activations: `blocks` lists the IR-SE-50 body units (0-23) whose outputs
  are read, and `model_path` is the e4e checkpoint; no generator is run.

e4e checkpoints are torch.save dicts {'state_dict', 'opts', 'latent_avg'}: 'state_dict' holds the pSp wrapper's
'encoder.' entries, loaded strictly here, and 'decoder.' entries, a rosinality-format copy of the generator,
which are not used (the generator comes from model_path); 'opts' is a dict of the training options (plain
values, so the file loads with weights_only=True); 'latent_avg' is the generator's average latent, repeated
per W+ entry [num_ws, w_dim], added to the encoder's output when opts['start_from_latent_avg'] is set. The
encoder sees the image resized to `encoder_size` (256, as e4e trains and infers) and scaled to [-1, 1].
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.checkpoint import CheckpointError, load_state_dict_strict, safe_load

from . import batch_result, image_tensor, register, stylegan2

# Encoder4Editing(50, 'ir_se'): the stem width (the first stage's depth) and the W+ code width of the
# released encoders. Tests shrink both to get small models with the same units, taps and heads.
ARCHITECTURE = dict(width=64, w_dim=512)
# IR-SE-50 (get_blocks(50)): per stage, the depth as a multiple of the stem width and the number of units;
# the first unit of each stage halves the resolution.
STAGES = ((1, 3), (2, 4), (4, 14), (8, 3))
NUM_UNITS = sum(units for _, units in STAGES)
# W+ entries predicted from the coarsest pyramid level (16x16 at a 256 input), then the middle (32x32); the
# rest from the finest (64x64). Each head halves its level down to one pixel: 4, 5 and 6 stride-2 convs.
COARSE_STYLES, MIDDLE_STYLES = 3, 7
HEAD_HALVINGS = (4, 5, 6)
SE_REDUCTION = 16
ENCODER_SIZE = 256  # e4e's input: every image is resized to 256x256 (configs/transforms_config.py)
READINGS = ("generator", "encoder")
# The encoder reading never runs the style heads: a random encoder gets one, not 18 (200M weights unused).
UNREAD_STYLES = 1
ENCODER_PREFIX, DECODER_PREFIX = "encoder.", "decoder."


class SqueezeExcite(nn.Module):
    """Channel gates from the globally pooled map: two bias-free 1x1 convs, ReLU between, sigmoid after."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x):
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))
        return x * gate


class IRSEUnit(nn.Module):
    """bottleneck_IR_SE: BN, 3x3 conv, PReLU, 3x3 conv (strided), BN, squeeze-excite, plus a shortcut that is a
    strided 1x1 conv + BN where the depth changes and a plain subsampling (MaxPool2d(1, stride)) where not."""

    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SqueezeExcite(depth, SE_REDUCTION),
        )

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class EqualLinear(nn.Module):
    """StyleGAN2's equalised-learning-rate linear layer (learning-rate multiplier 1): the weight is stored
    unscaled and multiplied by 1/sqrt(fan_in) when used."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = in_features ** -0.5

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class StyleHead(nn.Module):
    """GradualStyleBlock: stride-2 3x3 convs with LeakyReLU (slope 0.01) down to one pixel, then an
    EqualLinear: one W+ entry (or its delta) from one pyramid level."""

    def __init__(self, in_channels: int, w_dim: int, halvings: int):
        super().__init__()
        layers = []
        for i in range(halvings):
            layers += [nn.Conv2d(in_channels if i == 0 else w_dim, w_dim, 3, stride=2, padding=1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(w_dim, w_dim)

    def forward(self, x):
        # flatten(1) of a map left larger than one pixel (an input over 256) fails in the linear layer
        # instead of being read as several codes.
        return self.linear(self.convs(x).flatten(1))


def upsample_add(top: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    """The feature pyramid's merge: `top` resized bilinearly (corners aligned) to `lateral`'s size, added."""
    return F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=True) + lateral


def pyramid_taps() -> tuple:
    """Body units whose outputs feed the pyramid: the last units of stages 2, 3 and 4 (6, 20, 23)."""
    ends = np.cumsum([units for _, units in STAGES]) - 1
    return tuple(int(e) for e in ends[1:])


class Encoder4Editing(nn.Module):
    """e4e's encoder (IR-SE-50 body, feature pyramid, one style head per W+ entry), in inference mode: every
    progressive delta applied. Module names and parameters are those of e4e checkpoints' 'encoder.' entries."""

    def __init__(self, num_styles: int, w_dim: int = 512, width: int = 64):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                         nn.PReLU(width))
        units, in_channels = [], width
        for multiple, count in STAGES:
            depth = width * multiple
            units += [IRSEUnit(in_channels, depth, 2)] + [IRSEUnit(depth, depth, 1) for _ in range(count - 1)]
            in_channels = depth
        self.body = nn.Sequential(*units)
        top = width * STAGES[-1][0]
        self.styles = nn.ModuleList(StyleHead(top, w_dim, HEAD_HALVINGS[pyramid_level(i)]) for i in range(num_styles))
        self.latlayer1 = nn.Conv2d(width * STAGES[2][0], top, 1)
        self.latlayer2 = nn.Conv2d(width * STAGES[1][0], top, 1)

    @property
    def num_styles(self) -> int:
        return len(self.styles)

    @property
    def w_dim(self) -> int:
        return self.styles[0].linear.weight.shape[0]

    def image_input(self, image: np.ndarray, size: int) -> torch.Tensor:
        """encoder_input on this encoder's device, in its dtype."""
        weight = self.input_layer[0].weight
        return encoder_input(image, size, weight.device, weight.dtype)

    def body_outputs(self, x: torch.Tensor, units) -> list:
        """The outputs of the body units `units` (ascending indices), running the body no further than needed."""
        x = self.input_layer(x)
        taken = []
        for i, unit in enumerate(self.body[:units[-1] + 1]):
            x = unit(x)
            if i in units:
                taken.append(x)
        return taken

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] in [-1, 1] -> W+ codes [N, num_styles, w_dim]: the first entry, and the first entry plus
        a delta for every other (latent_avg not added)."""
        c1, c2, c3 = self.body_outputs(x, pyramid_taps())
        p2 = upsample_add(c3, self.latlayer1(c2))
        levels = (c3, p2, upsample_add(p2, self.latlayer2(c1)))
        w0 = self.styles[0](c3)
        codes = [w0] + [w0 + head(levels[pyramid_level(i)]) for i, head in enumerate(self.styles) if i > 0]
        return torch.stack(codes, dim=1)


def pyramid_level(style: int) -> int:
    """Which pyramid level W+ entry `style` is predicted from: 0 coarse, 1 middle, 2 fine."""
    return 0 if style < COARSE_STYLES else 1 if style < MIDDLE_STYLES else 2


# ---------------------------------------------------------------- e4e checkpoints


def read_e4e_checkpoint(path: str):
    """(encoder state_dict, latent offset or None) of an e4e checkpoint: the 'encoder.' entries of
    ckpt['state_dict'] without the prefix, and ckpt['latent_avg'] where e4e adds it to the codes."""
    ckpt = safe_load(path, "e4e checkpoint")
    state_dict = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        found = f"keys {sorted(ckpt)[:5]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"e4e checkpoint {path!r} is not usable: expected {{'state_dict': pSp state_dict "
                              f"of tensors, 'latent_avg': tensor, 'opts': dict}}, found {found}")
    foreign = sorted(k for k in state_dict if not k.startswith((ENCODER_PREFIX, DECODER_PREFIX)))
    if foreign or not any(k.startswith(ENCODER_PREFIX) for k in state_dict):
        raise CheckpointError(f"e4e checkpoint {path!r} is not usable: its state_dict must hold 'encoder.' "
                              f"(and 'decoder.') entries, found {foreign[:5] or sorted(state_dict)[:5]}")
    encoder = {k.removeprefix(ENCODER_PREFIX): v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
    return encoder, latent_offset(ckpt, path)


def latent_offset(ckpt: dict, path: str):
    """ckpt['latent_avg'] if e4e adds it to the codes (pSp.forward: when opts['start_from_latent_avg'] is
    set; a file without opts, as load_e4e_standalone reads it: whenever it is there), else None."""
    latent_avg = ckpt.get("latent_avg")
    opts = ckpt.get("opts")
    if opts is not None and not isinstance(opts, dict):
        raise CheckpointError(f"e4e checkpoint {path!r}: 'opts' must be a dict of training options, "
                              f"found {type(opts).__name__}")
    added = latent_avg is not None if opts is None else bool(opts.get("start_from_latent_avg", False))
    if not added:
        return None
    if not isinstance(latent_avg, torch.Tensor):
        # pSp would then average 10,000 random latents of its decoder: not a reproducible offset.
        raise CheckpointError(f"e4e checkpoint {path!r} was trained with start_from_latent_avg but holds no "
                              f"'latent_avg' tensor to add to its codes (found {type(latent_avg).__name__})")
    return latent_avg


def checked_offset(latent_avg, encoder: Encoder4Editing, path: str):
    """latent_avg as [num_styles, w_dim] ([num_styles or 1, w_dim] or [w_dim] broadcast, as pSp adds it)."""
    if latent_avg is None:
        return None
    shape = (encoder.num_styles, encoder.w_dim)
    if tuple(latent_avg.shape) not in (shape, (1, shape[1]), shape[1:]):
        raise CheckpointError(f"e4e checkpoint {path!r}: 'latent_avg' has shape {tuple(latent_avg.shape)}, "
                              f"expected {shape} (one average latent per W+ entry)")
    return latent_avg.expand(shape).clone()


def styles_in(state_dict: dict) -> int:
    """The number of style heads (W+ entries) an encoder state_dict holds."""
    return len({k.split(".")[1] for k in state_dict if k.startswith("styles.")})


def load_encoder(path: str, num_styles: int, architecture: dict):
    """(Encoder4Editing, latent offset or None) of an e4e checkpoint, loaded strictly. num_styles: the W+
    entries the encoder must predict (the generator's num_ws), or None to take the checkpoint's."""
    state_dict, latent_avg = read_e4e_checkpoint(path)
    found = styles_in(state_dict)
    if num_styles is not None and found != num_styles:
        raise CheckpointError(f"e4e checkpoint {path!r} predicts {found} W+ entries, the generator takes "
                              f"{num_styles}: pair the encoder with the generator it was trained for")
    encoder = Encoder4Editing(found, **architecture)
    load_state_dict_strict(encoder, state_dict, path, hints=None)
    return encoder, checked_offset(latent_avg, encoder, path)


# ---------------------------------------------------------------- features


def encoder_input(image: np.ndarray, size: int, device, dtype) -> torch.Tensor:
    """uint8 [H, W, 3] or [N, H, W, 3] -> [N, 3, size, size] in [-1, 1], as e4e's test transform makes it:
    resized bilinearly (antialiased, as PIL's Resize) to size x size, then scaled to [-1, 1]."""
    x = image_tensor(image, device, "symmetric")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.to(dtype)


class InvertedGeneratorFeatures:
    """The generator reading: the synthesis network's maps at `resolutions` for the image's W+ codes."""

    def __init__(self, encoder, latent_avg, generator, resolutions, encoder_size: int):
        if (encoder.num_styles, encoder.w_dim) != (generator.num_ws, generator.w_dim):
            raise ValueError(f"the encoder predicts {encoder.num_styles} W+ entries of width {encoder.w_dim}, the "
                             f"generator takes {generator.num_ws} of width {generator.w_dim}")
        self.encoder, self.generator = encoder, generator
        self.latent_avg = latent_avg
        self.resolutions = tuple(resolutions)
        self.encoder_size = encoder_size

    def encode(self, image: np.ndarray) -> torch.Tensor:
        """W+ codes [N, num_ws, w_dim] of the image(s), latent_avg added where e4e adds it."""
        codes = self.encoder(self.encoder.image_input(image, self.encoder_size))
        return codes if self.latent_avg is None else codes + self.latent_avg

    @torch.no_grad()
    def __call__(self, image: np.ndarray, view: int = 0) -> list:
        """uint8 [H, W, 3] -> one map [C_r, r, r] per resolution r read, ascending; [N, H, W, 3] -> [N, C_r, r, r]."""
        _, maps = self.generator.synthesis(self.encode(image), read=self.resolutions)
        return batch_result(image, maps)


class EncoderFeatures:
    """The encoder reading: the outputs of the IR-SE body units `units`."""

    def __init__(self, encoder, units, encoder_size: int):
        self.encoder = encoder
        self.units = tuple(units)
        self.encoder_size = encoder_size

    @torch.no_grad()
    def __call__(self, image: np.ndarray, view: int = 0) -> list:
        """uint8 [H, W, 3] -> one map [C, h, w] per unit read, in unit order; [N, H, W, 3] -> [N, C, h, w]."""
        x = self.encoder.image_input(image, self.encoder_size)
        return batch_result(image, self.encoder.body_outputs(x, self.units))


# ---------------------------------------------------------------- config and builder


def check_gan_encoder_config(cfg: dict, path: str) -> None:
    reading = cfg.get("features", READINGS[0])
    if reading not in READINGS:
        raise ValueError(f"{path}: 'features' must be one of {list(READINGS)}, got {reading!r}")
    size = cfg.get("encoder_size", ENCODER_SIZE)
    if not (16 <= size <= ENCODER_SIZE and size % 16 == 0):
        raise ValueError(f"{path}: 'encoder_size' must be a multiple of 16 in 16..{ENCODER_SIZE} (the style heads "
                         f"pool a {ENCODER_SIZE}-pixel input's maps down to one pixel), got {size}")
    if cfg["input_activations"]:
        raise ValueError(f"{path}: 'input_activations' must be false for gan_encoder: the maps read are outputs")
    if not cfg["blocks"]:
        raise ValueError(f"{path}: 'blocks' must list the generator resolutions (features 'generator') or the "
                         "encoder body units (features 'encoder') to read")
    if reading == "generator":
        if "encoder_path" not in cfg:
            raise ValueError(f"{path}: features 'generator' needs 'encoder_path', the e4e checkpoint "
                             "(model_path is the StyleGAN2 generator)")
        odd = [b for b in cfg["blocks"] if b < 4 or b & (b - 1)]
        if odd:
            raise ValueError(f"{path}: 'blocks' are generator resolutions (powers of two from 4), got {odd}")
        name = cfg.get("generator")
        if name is not None and name not in stylegan2.ARCHITECTURES:
            raise ValueError(f"{path}: 'generator' must name a StyleGAN2 architecture "
                             f"({sorted(stylegan2.ARCHITECTURES)}), got {name!r}")
    else:
        generator_keys = sorted({"encoder_path", "generator"} & set(cfg))
        if generator_keys:
            raise ValueError(f"{path}: features 'encoder' runs the e4e encoder alone: give its checkpoint as "
                             f"model_path and drop {generator_keys}")
        odd = [b for b in cfg["blocks"] if b >= NUM_UNITS]
        if odd:
            raise ValueError(f"{path}: 'blocks' are encoder body units 0..{NUM_UNITS - 1}, got {odd}")


@register("gan_encoder", config_keys={"encoder_path": (str, False), "encoder_size": (int, False),
                                      "features": (str, False), "generator": (str, False)},
          check_config=check_gan_encoder_config)
def build_gan_encoder(cfg, model_flags, device, seed, random_init, dtype):
    options = cfg.backbone_options
    encoder_size = options.get("encoder_size", ENCODER_SIZE)
    if options.get("features", READINGS[0]) == "encoder":
        if random_init:
            torch.manual_seed(seed)
            encoder = Encoder4Editing(UNREAD_STYLES, **ARCHITECTURE)
        else:
            encoder, _ = load_encoder(cfg.model_path, None, ARCHITECTURE)
        encoder.to(device, dtype).eval()
        return EncoderFeatures(encoder, cfg.blocks, encoder_size)
    # model_path, or the architecture named by `generator` (checked against the file; what --random_init builds)
    generator = stylegan2.build_generator(cfg, seed, random_init)
    too_fine = [r for r in cfg.blocks if r > generator.img_resolution]
    if too_fine:
        raise ValueError(f"blocks {too_fine} exceed the generator's resolution {generator.img_resolution}")
    if random_init:  # seeded with the generator, drawn after it
        encoder = Encoder4Editing(generator.num_ws, **ARCHITECTURE)
        # What e4e adds is the generator's average latent (rosinality's conversion copies NVIDIA's dlatent_avg).
        latent_avg = generator.w_avg.expand(generator.num_ws, -1).clone()
    else:
        encoder, latent_avg = load_encoder(options["encoder_path"], generator.num_ws, ARCHITECTURE)
    encoder.to(device, dtype).eval()
    generator.to(device, dtype).eval()
    if latent_avg is not None:
        latent_avg = latent_avg.to(device, dtype)
    return InvertedGeneratorFeatures(encoder, latent_avg, generator, cfg.blocks, encoder_size)

