"""Class names, colour palettes and label conventions of the benchmark datasets.

The six benchmarks' facts live in the packaged class_info.json (taken from the
official ddpm-segmentation code). Datasets outside that file (user data, the
demo) get generated names and a generated palette.
"""

import functools
import json
from importlib import resources

import numpy as np

_INFO_FILE = "class_info.json"
# Bit-interleaving below spreads 24 bits of an id over r, g and b.
_MAX_DEFAULT_CLASSES = 2**24 - 1


@functools.lru_cache(maxsize=None)
def _load_table() -> dict:
    text = resources.files("ddpm_seg").joinpath(_INFO_FILE).read_text(encoding="utf-8")
    table = json.loads(text)
    # Keys starting with "_" are provenance notes, not datasets.
    return {name: entry for name, entry in table.items() if not name.startswith("_")}


def dataset_names() -> list:
    """Names of the benchmark datasets with packaged class info."""
    return sorted(_load_table())


def dataset_info(name: str) -> dict:
    """Class names, palette [K, 3] uint8, number_class and ignore_label of a benchmark."""
    table = _load_table()
    if name not in table:
        raise ValueError(f"unknown dataset {name!r} in {_INFO_FILE}; expected one of {dataset_names()}")
    entry = table[name]
    number_class = int(entry["number_class"])
    palette = np.asarray(entry["palette"], dtype=np.int64)
    if palette.size != 3 * number_class or len(entry["class_names"]) != number_class:
        raise ValueError(
            f"{_INFO_FILE}[{name!r}]: expected {number_class} class names and {3 * number_class} palette values, "
            f"got {len(entry['class_names'])} and {palette.size}"
        )
    if palette.min() < 0 or palette.max() > 255:
        raise ValueError(f"{_INFO_FILE}[{name!r}]: palette values must lie in 0..255")
    return dict(
        class_names=list(entry["class_names"]),
        palette=palette.reshape(number_class, 3).astype(np.uint8),
        number_class=number_class,
        ignore_label=int(entry["ignore_label"]),
    )


def default_class_names(n: int) -> list:
    """Placeholder names class_0 ... class_{n-1} for datasets without a name list."""
    if n < 1:
        raise ValueError(f"number of classes must be >= 1, got {n}")
    return [f"class_{i}" for i in range(n)]


def default_palette(n: int) -> np.ndarray:
    """n distinct, deterministic colours as uint8 [n, 3].

    Colour of class i comes from scattering the bits of i + 1 over the high bits of
    r, g and b (bit 0 -> r, bit 1 -> g, bit 2 -> b, next three bits one level lower,
    ...). This is a bijection, so colours are distinct, and the first classes get the
    strongest contrast. The +1 keeps pure black free for ignored pixels.
    """
    if not 1 <= n <= _MAX_DEFAULT_CLASSES:
        raise ValueError(f"number of classes must be in 1..{_MAX_DEFAULT_CLASSES}, got {n}")
    ids = np.arange(1, n + 1, dtype=np.int64)
    palette = np.zeros((n, 3), dtype=np.int64)
    for level in range(8):
        for channel in range(3):
            bit = (ids >> (3 * level + channel)) & 1
            palette[:, channel] |= bit << (7 - level)
    return palette.astype(np.uint8)


def class_table(cfg) -> tuple:
    """(class names, palette [K, 3] uint8) of an experiment: the config's own class_names / palette, else its
    benchmark's packaged table (category; only for the benchmark's own number of classes), else generated ones."""
    n = cfg.number_class
    category = cfg.category
    info = dataset_info(category) if category in dataset_names() else None
    if info is not None and info["number_class"] != n:
        info = None  # allowed only with the config's own class_names (see config.py)
    names = cfg.class_names or (info["class_names"] if info else default_class_names(n))
    palette = cfg.palette
    if palette:
        return names, np.array(palette, dtype=np.uint8).reshape(-1, 3)
    return names, (info["palette"] if info else default_palette(n))
