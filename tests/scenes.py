"""Generated labelled images for end-to-end tests: a bright square (class 1) and a dark bar (class 2)
on a textured grey background (class 0), one ignored pixel, in the official folder layout."""

import numpy as np
from PIL import Image


def square_and_bar(rng, size, bar):
    image = np.full((size, size, 3), 120, dtype=np.uint8) + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
    label = np.zeros((size, size), dtype=np.uint8)
    side = 3 * size // 8
    y, x = rng.integers(2, size - side - 2, 2)
    image[y:y + side, x:x + side] = 230
    label[y:y + side, x:x + side] = 1
    col = rng.integers(0, size - bar)
    image[:, col:col + bar] = 20
    label[:, col:col + bar] = 2
    label[0, 0] = 255  # an ignored pixel
    return image, label


def write_splits(root, counts, size, bar):
    """root/<split>/NNN.png + NNN.npy for each split in `counts` ({"train": 4, ...}); returns root."""
    rng = np.random.default_rng(0)
    for split, n in counts.items():
        folder = root / split
        folder.mkdir(parents=True)
        for i in range(n):
            image, label = square_and_bar(rng, size, bar)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
            np.save(folder / f"{i:03d}.npy", label)
    return root
