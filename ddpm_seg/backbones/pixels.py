"""Raw RGB pixels as features: the baseline that tells how much a backbone adds beyond colour."""

import numpy as np

from . import batch_result, image_tensor, register


def pixel_features(image: np.ndarray, view: int = 0) -> list:
    """uint8 [H, W, 3] -> one map [3, H, W] scaled to [-1, 1] ([N, H, W, 3] -> [N, 3, H, W]); no noise, so every
    test view is read alike."""
    return batch_result(image, [image_tensor(image, "cpu", "symmetric")])


@register("pixels")
def build_pixels(cfg, model_flags, device, seed, random_init, dtype):
    # No network to run: the colours are exact in float32 whatever `dtype`.
    return pixel_features
