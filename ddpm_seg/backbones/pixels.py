"""Raw RGB pixels as features: the baseline that tells how much a backbone adds beyond colour."""

import numpy as np
import torch

from . import register


def pixel_features(image: np.ndarray) -> list:
    """uint8 [H, W, 3] -> one map [3, H, W] scaled to [-1, 1]."""
    return [torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1]


@register("pixels")
def build_pixels(cfg, model_flags, device, seed, random_init):
    return pixel_features
