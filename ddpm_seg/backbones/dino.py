"""DINOv2 and DINOv3 features: patch tokens of chosen transformer blocks of a self-supervised ViT, built by timm.

The paper (Baranchuk et al.) has no DINO row: this backbone is a present-day baseline beside its MAE and SwAV
ones. It reads the outputs of the blocks listed in the experiment's `blocks` (0-based block indices), with the
final LayerNorm applied to each as DINOv2's get_intermediate_layers does by default (config `final_norm`), and
returns each as a [embed_dim, h / patch, w / patch] map, class and register tokens dropped; the feature store
upsamples them like MAE's. The shipped configs read the last four blocks of ViT-L (20..23), the layers DINOv2's
multi-layer linear probes (n_last_blocks 4, classification and the "+ms" segmentation probes) concatenate.

The image is ImageNet-normalised and resized (bicubic) to `input_size` before the ViT. A 14-pixel patch does
not divide 256, so the default input size puts the patch grid at 1/8 of the image side, the stride of MAE's
ViT-L/8: 256 -> 448 for DINOv2 (32x32 patches of 14), 256 -> 512 for DINOv3 (32x32 patches of 16).

Config keys of their own: `arch` (a timm architecture of ARCHITECTURES; default ViT-L/14 for dinov2, ViT-L/16
for dinov3), `input_size` ([height, width], multiples of the patch) and `final_norm` (default true).

Checkpoints, recognised by their bytes and keys, never by their name:
- Meta's DINOv2 release files (dinov2_vitl14_pretrain.pth ...): a plain state_dict in Meta's names, with
  `mask_token` and position embeddings for 518 px (37x37 patches + class token). They are converted to timm's
  names (mask_token dropped; giant's SwiGLU w12/w3 -> fc1/fc2; with registers, timm keeps the class token out
  of the position embeddings, so the class position is added to the class token).
- timm / Hugging Face `model.safetensors` files (timm's names), DINOv2 or DINOv3. safetensors holds tensors
  only, so loading it runs no code; torch files are read with weights_only.
DINOv2's position embeddings are resampled once, at load, to the configured patch grid, exactly as Meta's
model interpolates them at every forward when given another size (bicubic, no antialiasing, scale factor
(grid + 0.1) / pretrained grid): the features are those of Meta's model at that input size. timm's runtime
resampling (dynamic_img_size) antialiases, which gives other numbers when the grid shrinks. DINOv3 uses
rotary position embeddings computed for any grid: nothing to resample.
Meta's own DINOv3 files (storage_tokens, ls1.gamma, qkv bias masks) are refused: use timm's safetensors.
"""

import math
import os

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from guided_diffusion.checkpoint import CheckpointError, load_state_dict_strict, read_state_dict

from . import batch_result, image_tensor, register

# model_type -> timm architecture -> the arguments it is built with. The values are timm's own for that
# architecture (checked by the tests); they are spelled out so that configs can be checked without building
# a model, and so that tests can shrink the widths keeping the depth.
ARCHITECTURES = {
    "dinov2": {
        f"vit_{size}_patch14{registers}_dinov2": dict(patch_size=14, embed_dim=embed_dim, depth=depth,
                                                      num_heads=num_heads)
        for size, embed_dim, depth, num_heads in (("small", 384, 12, 6), ("base", 768, 12, 12),
                                                  ("large", 1024, 24, 16), ("giant", 1536, 40, 24))
        for registers in ("", "_reg4")
    },
    "dinov3": {
        f"vit_{size}_patch16_dinov3{qkv_bias}": dict(patch_size=16, embed_dim=embed_dim, depth=depth,
                                                     num_heads=num_heads)
        for size, embed_dim, depth, num_heads in (("small", 384, 12, 6), ("small_plus", 384, 12, 6),
                                                  ("base", 768, 12, 12), ("large", 1024, 24, 16),
                                                  ("huge_plus", 1280, 32, 20))
        for qkv_bias in ("", "_qkvb")
    },
}
ARCHITECTURES["dinov3"]["vit_7b_patch16_dinov3"] = dict(patch_size=16, embed_dim=4096, depth=40, num_heads=32)
DEFAULT_ARCH = {"dinov2": "vit_large_patch14_dinov2", "dinov3": "vit_large_patch16_dinov3"}
# The default input size puts this many image pixels (at the config's dim) on one patch.
DEFAULT_STRIDE = 8
# Meta's interpolate_pos_encoding: scale factor (grid + offset) / pretrained grid, bicubic, no antialiasing.
MODEL_INTERPOLATE_OFFSET = 0.1
CONFIG_KEYS = {"arch": (str, False), "input_size": (list, False), "final_norm": (bool, False)}


def architecture(model_type: str, options: dict, path: str = "<config>"):
    """(arch name, its ARCHITECTURES entry) of an experiment's backbone options."""
    arch = options.get("arch", DEFAULT_ARCH[model_type])
    if arch not in ARCHITECTURES[model_type]:
        raise ValueError(f"{path}: 'arch' must be one of {sorted(ARCHITECTURES[model_type])} for model_type "
                         f"{model_type!r}, got {arch!r}")
    return arch, ARCHITECTURES[model_type][arch]


def input_size(options: dict, dim, patch_size: int, path: str = "<config>") -> tuple:
    """The (height, width) the image is resized to: `input_size`, or the size that makes one patch cover
    DEFAULT_STRIDE pixels of the dim[:2] image."""
    if "input_size" not in options:
        if dim[0] % DEFAULT_STRIDE or dim[1] % DEFAULT_STRIDE:
            raise ValueError(f"{path}: 'dim' {dim[:2]} is not a multiple of {DEFAULT_STRIDE}: give 'input_size' "
                             f"[height, width], multiples of the patch ({patch_size})")
        return tuple(side // DEFAULT_STRIDE * patch_size for side in dim[:2])
    size = options["input_size"]
    if (len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
            or any(s % patch_size for s in size)):
        raise ValueError(f"{path}: 'input_size' must be [height, width], positive multiples of the patch "
                         f"({patch_size}), got {size!r}")
    return tuple(size)


def check_config(cfg: dict, path: str) -> None:
    model_type = cfg["model_type"]
    arch, spec = architecture(model_type, cfg, path)
    input_size(cfg, cfg["dim"], spec["patch_size"], path)
    blocks, depth = cfg["blocks"], spec["depth"]
    if not blocks or blocks[-1] >= depth:
        raise ValueError(f"{path}: 'blocks' must list 0-based indices of the {depth} transformer blocks of {arch} "
                         f"(0..{depth - 1}; the last four: {list(range(depth - 4, depth))}), got {blocks}")
    if cfg["input_activations"]:
        raise ValueError(f"{path}: 'input_activations' must be false for model_type {model_type!r}: blocks are "
                         "read at their outputs; block i's input is block i - 1's output")
    channels = len(blocks) * spec["embed_dim"]
    if cfg["dim"][2] != channels:
        raise ValueError(f"{path}: 'dim'[2] must be {channels} ({len(blocks)} blocks x {spec['embed_dim']} channels "
                         f"of {arch}), got {cfg['dim'][2]}")


def create_vit(arch: str, spec: dict, image_size: tuple) -> torch.nn.Module:
    """timm's `arch` for images of image_size, without classifier head, in timm's parameter names."""
    return timm.create_model(arch, pretrained=False, num_classes=0, img_size=image_size, **spec)


# ---------------------------------------------------------------- checkpoint files


def is_safetensors(path: str) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian), then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def read_safetensors(path: str, what: str) -> dict:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{what} {path!r} is not a readable safetensors file (truncated or corrupt): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def read_checkpoint(path: str, model_type: str) -> dict:
    """The tensors of a safetensors file or of a torch state_dict file (read without running code)."""
    what = f"{model_type} checkpoint"
    if os.path.isfile(path) and is_safetensors(path):
        return read_safetensors(path, what)
    return read_state_dict(path, what)


def is_meta_layout(state_dict: dict) -> bool:
    """Meta's release files keep the masked-modelling token; timm's never do."""
    return "mask_token" in state_dict


def meta_dinov2_to_timm(state_dict: dict) -> dict:
    """Meta's DINOv2 names -> timm's (position embeddings left at the pretrained grid)."""
    renamed = {}
    for key, value in state_dict.items():
        if key == "mask_token":
            continue  # only masked-image pre-training uses it
        renamed[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    if "register_tokens" in renamed:
        # Meta adds the class position to the class token before inserting the registers; timm's register
        # models keep every prefix token out of the position embeddings.
        pos_embed = renamed.pop("pos_embed")
        renamed["reg_token"] = renamed.pop("register_tokens")
        renamed["cls_token"] = renamed["cls_token"] + pos_embed[:, :1]
        renamed["pos_embed"] = pos_embed[:, 1:]
    return renamed


def square_side(count: int):
    """The side of a square grid of `count` patches, or None."""
    side = math.isqrt(max(count, 0))
    return side if side and side * side == count else None


def resample_pos_embed(pos_embed: torch.Tensor, prefix_tokens: int, grid: tuple) -> torch.Tensor:
    """[1, prefix + M*M, D] position embeddings of a square M x M pretraining grid -> [1, prefix + gh*gw, D],
    interpolated as Meta's DINOv2 does at every forward (prefix entries kept as they are)."""
    prefix, patches = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    side = square_side(patches.shape[1])
    if (side, side) == tuple(grid):
        return pos_embed
    square = patches.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = tuple((g + MODEL_INTERPOLATE_OFFSET) / side for g in grid)
    resized = F.interpolate(square, scale_factor=scale, mode="bicubic", antialias=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, resized], dim=1)


def timm_state_dict(state_dict: dict, model: torch.nn.Module, model_type: str, path: str) -> dict:
    """A checkpoint's tensors in the names and position-embedding grid of `model`. Position embeddings that
    are no square grid behind the model's prefix tokens (another architecture's) are left for the strict
    load to report."""
    if is_meta_layout(state_dict):
        if model_type != "dinov2":
            raise CheckpointError(f"{path!r} is in Meta's own DINOv3 layout (mask_token, storage_tokens), which "
                                  "is not supported: use timm's model.safetensors of the same weights")
        state_dict = meta_dinov2_to_timm(state_dict)
    pos_embed = state_dict.get("pos_embed")
    if getattr(model, "pos_embed", None) is not None and pos_embed is not None and pos_embed.dim() == 3:
        prefix_tokens = 0 if model.no_embed_class else model.num_prefix_tokens
        if square_side(pos_embed.shape[1] - prefix_tokens):
            state_dict = dict(state_dict, pos_embed=resample_pos_embed(pos_embed, prefix_tokens,
                                                                       model.patch_embed.grid_size))
    return state_dict


def architecture_hints(expected: dict, found: dict) -> list:
    """Which registered architecture a mismatching file is, from its patch embedding and block count."""
    patch_key = "patch_embed.proj.weight"
    if patch_key not in found:
        return [f"this is not a DINOv2/DINOv3 ViT in Meta's or timm's names: it has no {patch_key} "
                f"(e.g. {', '.join(list(found)[:3])}); Hugging Face transformers' layout is not supported"]
    embed_dim, patch = found[patch_key].shape[0], found[patch_key].shape[-1]
    depth = len({key.split(".")[1] for key in found if key.startswith("blocks.")})
    registers = "reg_token" in found
    # DINOv3 has rotary position embeddings and registers; DINOv2 learnt ones, and registers in _reg4 only.
    family = ARCHITECTURES["dinov3"] if "pos_embed" not in found else {
        arch: spec for arch, spec in ARCHITECTURES["dinov2"].items() if ("_reg4_" in arch) == registers}
    fits = sorted(f"{arch} (model_type {model_type})" for model_type, archs in ARCHITECTURES.items()
                  for arch, spec in archs.items() if arch in family
                  and (spec["patch_size"], spec["embed_dim"], spec["depth"]) == (patch, embed_dim, depth))
    described = (f"the checkpoint is a {depth}-block ViT with {embed_dim} channels, {patch}-pixel patches "
                 f"and {'' if registers else 'no '}register tokens")
    return [described + (f": set 'arch' (and model_type) to one of {fits}" if fits else "")]


def load_checkpoint(model: torch.nn.Module, path: str, model_type: str) -> None:
    state_dict = timm_state_dict(read_checkpoint(path, model_type), model, model_type, path)
    load_state_dict_strict(model, state_dict, path, hints=architecture_hints)


# ---------------------------------------------------------------- features


class DINOFeatureExtractor:
    def __init__(self, vit: torch.nn.Module, blocks: list, image_size: tuple, final_norm: bool = True):
        self.vit = vit
        self.blocks = list(blocks)
        self.image_size = tuple(image_size)
        self.final_norm = final_norm

    @property
    def weight(self) -> torch.Tensor:
        return self.vit.patch_embed.proj.weight

    @torch.no_grad()
    def __call__(self, image: np.ndarray, view: int = 0) -> list:
        """uint8 [H, W, 3] -> one [embed_dim, h / patch, w / patch] map per block of `blocks` (h, w: the input
        size); [N, H, W, 3] -> the same maps with a leading batch dimension."""
        x = image_tensor(image, self.weight.device, "imagenet")
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        maps = self.vit.forward_intermediates(x.to(self.weight.dtype), indices=self.blocks, norm=self.final_norm,
                                              output_fmt="NCHW", intermediates_only=True, stop_early=True)
        return batch_result(image, maps)


@register("dinov2", config_keys=CONFIG_KEYS, check_config=check_config)
@register("dinov3", config_keys=CONFIG_KEYS, check_config=check_config)
def build_dino(cfg, model_flags, device, seed, random_init, dtype):
    options = cfg.backbone_options
    arch, spec = architecture(cfg.model_type, options)
    image_size = input_size(options, cfg.dim, spec["patch_size"])
    if random_init:
        torch.manual_seed(seed)
    vit = create_vit(arch, spec, image_size)
    if not random_init:
        load_checkpoint(vit, cfg.model_path, cfg.model_type)
    # Every weight in `dtype`: timm's LayerNorm and softmax accumulate in float32 for bf16/fp16 inputs.
    vit.to(device, dtype).eval()
    return DINOFeatureExtractor(vit, cfg.blocks, image_size, options.get("final_norm", True))
