"""Raw RGB pixels as features: the baseline that tells how much a backbone adds beyond colour."""

import numpy as np

from . import image_tensor, register


def pixel_features(image: np.ndarray) -> list:
    """uint8 [H, W, 3] -> one map [3, H, W] scaled to [-1, 1]."""
    return [image_tensor(image, "cpu", "symmetric")[0]]


@register("pixels")
def build_pixels(cfg, model_flags, device, seed, random_init):
    return pixel_features
