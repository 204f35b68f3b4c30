"""Backbone registry: each backbone is one module that registers a builder under its model_type, with what the
rest of the toolkit needs to know of it (its own config keys and their checks, whether it is a diffusion model
that takes noise and can be swept over steps, whether its blocks are module names, whether model_path may be a
hub id, whether its checkpoint carries guided-diffusion model flags): adding a backbone touches only its file.

A builder takes (cfg, model_flags, device, seed, random_init, dtype), cfg being the config.Experiment (the
backbone's own keys in cfg.backbone_options), and returns a feature extractor: a
callable mapping one uint8 image [H, W, 3] (numpy) to a list of activation maps [C, h, w] at their native
resolution, in the order the experiment's `dim[-1]` features are concatenated, and a batch of images
[N, H, W, 3] to the same list with a leading batch dimension, [N, C, h, w]. Maps are float32 whatever
`dtype` (a torch dtype) the backbone computes in. The feature store, the ensemble and the evaluation never
look further than that list, so adding a backbone touches only its own file. An extractor may also carry
`bytes_per_image`, its estimate of one image's working memory, which sizes the default extraction batch.

Every extractor also takes `view=v`: which of the experiment's test views (config `test_views`, the
interpreter's test-time views of an image) the image is; training features are view 0. A diffusion backbone
with shared noise gives each view its own noise draws (view 0 has the original's); the others ignore it.
"""

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..device import available_memory_bytes, cpu_has_native_bf16

from ..seeding import derive_seed

BACKBONES = {}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --extract_dtype name -> torch dtype; "auto" is resolved by extract_dtype().
EXTRACT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Most images per forward when --extract_batch is not given. CPU: one, whose steps already make a batch
# (on the 2-core AVX2 CPU, the paper's UNet at 256x256 took 225 s per image one at a time and 310 s per image
# two at a time). CUDA: as many as fit, up to 16.
MAX_EXTRACT_BATCH = {"cpu": 1, "cuda": 16}
# Share of the free memory one batch's activations may take.
EXTRACT_MEMORY_SHARE = 0.25


def image_tensor(image: np.ndarray, device, normalise: str) -> torch.Tensor:
    """uint8 [H, W, 3] or [N, H, W, 3] -> float [1 or N, 3, H, W] on `device`, scaled as the backbone was
    trained: "symmetric" to [-1, 1] (DDPMs), "imagenet" to ImageNet mean/std (MAE, SwAV)."""
    image = np.asarray(image)
    if image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 image [H, W, 3] or a batch [N, H, W, 3], got shape {image.shape}")
    x = torch.from_numpy(np.array(image)).to(device)
    # [None] after the permute, not before: strides decide which convolution kernel runs, and a single image
    # keeps the layout its features were validated with.
    x = (x.permute(0, 3, 1, 2) if x.dim() == 4 else x.permute(2, 0, 1)[None]).float() / 255
    if normalise == "symmetric":
        return 2 * x - 1
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return (x - mean) / std


def batch_result(image: np.ndarray, maps: list) -> list:
    """The extractor contract's output for `image`: maps [N, C, h, w] for a batch, [C, h, w] for one image."""
    maps = [m.float() for m in maps]
    return maps if np.ndim(image) == 4 else [m[0] for m in maps]


def shared_noise(seed: int, draws: int, shape, device) -> torch.Tensor:
    """share_noise: [draws, *shape] from one seeded generator on `device`, made there as the original does;
    draw 0 is the original's single shared noise."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(draws, *shape, generator=generator, device=device)


def image_noise(seed: int, images: np.ndarray, view: int, draw: int, shape, device) -> torch.Tensor:
    """Without share_noise: [N, *shape] noise, image i's drawn from a generator seeded by (seed, the image's
    pixels, view, draw). Each image gets its own noise, yet the same image always gets the same noise, whatever
    else is extracted before it or beside it in a batch: a resumed extraction, an evaluation and predict give
    it the same features. Drawn on the CPU, so that every device gets the same noise."""
    images = np.asarray(images)
    images = images[None] if images.ndim == 3 else images
    draws = []
    for image in images:
        digest = int.from_bytes(hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()[:8], "little")
        generator = torch.Generator().manual_seed(derive_seed(seed, digest, view, draw))
        draws.append(torch.randn(*shape, generator=generator))
    return torch.stack(draws).to(device)


def check_noise_draws(noise, noise_draws: int, views: int = 1) -> None:
    """A diffusion extractor's noise_draws, and its shared noise (None: fresh draws) holding that many per view."""
    if noise_draws < 1:
        raise ValueError(f"noise_draws must be >= 1, got {noise_draws}")
    if noise is not None and len(noise) != noise_draws * views:
        raise ValueError(f"shared noise holds {len(noise)} draws, noise_draws x test views is {noise_draws * views}")


def view_noise(noise, noise_draws: int, view: int):
    """The shared noise draws of one test view (None stays None: fresh draws for every call)."""
    if noise is None:
        return None
    if not 0 <= view < len(noise) // noise_draws:
        raise ValueError(f"view {view} out of range: the shared noise was drawn for {len(noise) // noise_draws} test views")
    return noise[view * noise_draws:(view + 1) * noise_draws]


def extract_dtype(name: str, device, use_fp16: bool = False) -> torch.dtype:
    """--extract_dtype -> torch dtype. auto: on CUDA, float16 when the checkpoint was run so (use_fp16),
    else float32; on CPU, bfloat16 where the CPU has it natively, else float32."""
    if name != "auto":
        if name not in EXTRACT_DTYPES:
            raise ValueError(f"--extract_dtype must be auto or one of {sorted(EXTRACT_DTYPES)}, got {name!r}")
        return EXTRACT_DTYPES[name]
    if torch.device(device).type == "cuda":
        return torch.float16 if use_fp16 else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32  # emulated bf16 is far slower


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in EXTRACT_DTYPES.items()}[dtype]


def memory_per_image(extractor):
    """An extractor's estimate of one image's working memory in bytes, if it makes one (the DDPM's, after its
    first call); None otherwise."""
    return getattr(extractor, "bytes_per_image", None)


def extract_batch_size(requested, bytes_per_image, device) -> int:
    """--extract_batch, or as many images as fit in a quarter of the free memory (1..MAX_EXTRACT_BATCH[device]).
    bytes_per_image: the extractor's estimate of one image's working memory, if it has one yet (None: 1)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--extract_batch must be >= 1, got {requested}")
        return requested
    if bytes_per_image is None:
        return 1
    fits = int(EXTRACT_MEMORY_SHARE * available_memory_bytes(device) // max(1, bytes_per_image))
    return max(1, min(MAX_EXTRACT_BATCH[torch.device(device).type], fits))


def extract_batches(extractor, images, batch_size: int, view: int = 0):
    """Yield (indices, maps [n, C, h, w]) over `images` (a sequence of uint8 [H, W, 3]), batch_size at a time."""
    for start in range(0, len(images), batch_size):
        chunk = list(range(start, min(start + batch_size, len(images))))
        yield chunk, extractor(np.stack([images[i] for i in chunk]), view=view)


@dataclass(frozen=True)
class Backbone:
    """A registered backbone: its builder and its traits."""
    build: Callable  # (cfg, model_flags, device, seed, random_init, torch dtype) -> feature extractor
    config_keys: dict = field(default_factory=dict)  # experiment keys only it reads: name -> (type, required)
    check_config: Optional[Callable] = None  # (config dict, path) -> None: refuses values it cannot use, when validated
    noised: bool = False  # a diffusion model: noise_draws and share_noise apply; extractor.at_steps(steps) sweeps
    named_blocks: bool = False  # blocks are module names read in the order given, not output-block indices
    hub_model: bool = False  # model_path may be a hub id, resolved (and checked) when the backbone loads
    model_flags: bool = False  # its checkpoints carry guided-diffusion model flags (model_flags.json beside them)


def register(model_type: str, **traits):
    def wrap(builder):
        BACKBONES[model_type] = Backbone(builder, **traits)
        return builder

    return wrap


def backbone(model_type: str) -> Backbone:
    """The registered backbone of that model_type (the built-in ones register when first asked for)."""
    from . import alae, ddpm, dino, gan_encoder, gan_inversion, hf_diffusion, mae, pixels, swav, vdvae  # noqa: F401

    if model_type not in BACKBONES:
        raise ValueError(f"unknown model_type {model_type!r}; available backbones: {sorted(BACKBONES)}")
    return BACKBONES[model_type]


def create_feature_extractor(cfg, model_flags: dict, device, seed: int = 0, random_init: bool = False,
                             config_path: str = None, dtype: str = "fp32"):
    """The backbone cfg names, built, computing in `dtype` (an --extract_dtype name; auto resolved here); with
    config_path, a config value the backbone refuses (a block or step out of range, an unknown model_type) is
    reported as an error of that file."""
    from guided_diffusion.checkpoint import CheckpointError

    try:
        builder = backbone(cfg.model_type).build
        torch_dtype = extract_dtype(dtype, device, bool(model_flags.get("use_fp16")))
        return builder(cfg, model_flags, device, seed, random_init, torch_dtype)
    except CheckpointError:
        raise  # names its own file
    except ValueError as e:
        if config_path is None:
            raise
        raise ValueError(f"{config_path}: {e}") from None
