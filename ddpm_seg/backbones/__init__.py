"""Backbone registry: each backbone is one module that registers a builder under its model_type.

A builder takes (cfg, model_flags, device, seed, random_init) and returns a feature extractor: a callable
mapping one uint8 image [H, W, 3] (numpy) to a list of activation maps [C, h, w] at their native resolution,
in the order the experiment's `dim[-1]` features are concatenated. The feature store, the ensemble and the
evaluation never look further than that list, so adding a backbone touches only its own file.
"""

import numpy as np
import torch

BACKBONES = {}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_tensor(image: np.ndarray, device, normalise: str) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [1, 3, H, W] on `device`, scaled as the backbone was trained:
    "symmetric" to [-1, 1] (DDPMs), "imagenet" to ImageNet mean/std (MAE, SwAV)."""
    x = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)[None].float() / 255
    if normalise == "symmetric":
        return 2 * x - 1
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return (x - mean) / std


def register(model_type: str):
    def wrap(builder):
        BACKBONES[model_type] = builder
        return builder

    return wrap


def create_feature_extractor(cfg: dict, model_flags: dict, device, seed: int = 0, random_init: bool = False,
                             config_path: str = None):
    """The backbone cfg names, built; with config_path, a config value the backbone refuses (a block or step
    out of range, an unknown model_type) is reported as an error of that file."""
    # Import the built-in backbones so they register themselves.
    from guided_diffusion.checkpoint import CheckpointError

    from . import ddpm, hf_diffusion, mae, pixels, swav  # noqa: F401

    try:
        model_type = cfg["model_type"]
        if model_type not in BACKBONES:
            raise ValueError(f"unknown model_type {model_type!r}; available backbones: {sorted(BACKBONES)}")
        return BACKBONES[model_type](cfg, model_flags, device, seed, random_init)
    except CheckpointError:
        raise  # names its own file
    except ValueError as e:
        if config_path is None:
            raise
        raise ValueError(f"{config_path}: {e}") from None
