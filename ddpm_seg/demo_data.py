"""A synthetic "shapes" dataset for the built-in demo, in the official dataset layout.

Every scene is a textured background with a few textured objects of four kinds (disc, square,
triangle, ring). All objects and the background draw their colours and textures from the SAME
distributions, so the colour of a single pixel says almost nothing about its class: telling a
disc's interior from a square's needs the object's outline, i.e. spatial context. That is the
property the demo needs to show that DDPM features carry more than raw pixels.

Layout written under ``root`` (as the official ``datasets/<name>/`` folders):
    real/train/<stem>.png + <stem>.npy   labelled images; labels are uint8 HxW class ids
    real/test/<stem>.png  + <stem>.npy
    real/val/<stem>.png   + <stem>.npy    validation images, for choosing steps and blocks (never the test set)
    unlabelled/<stem>.png                pool for training the DDPM
    demo_dataset.json                    manifest, written last: its presence marks a complete dataset
"""

import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

DEMO_CLASS_NAMES = ["background", "disc", "square", "triangle", "ring"]
# Flat RGB list, the same format as the palettes in class_info.json.
DEMO_PALETTE = [0, 0, 0, 230, 25, 75, 60, 180, 75, 255, 225, 25, 0, 130, 200]

MANIFEST_NAME = "demo_dataset.json"
# Bump when the drawing code changes, so that a cached dataset from older code is rebuilt.
GENERATOR_VERSION = 1

# Each split draws image i from its own stream (seed, split, i): the test images do not change
# when the pool size does.
_SPLIT_IDS = {"unlabelled": 0, "train": 1, "test": 2, "val": 3}
_NUM_KINDS = len(DEMO_CLASS_NAMES) - 1


def _random_colour(rng):
    return rng.uniform(0.05, 0.95, size=3)


def _texture(rng, yy, xx, colour):
    """An HxWx3 texture around `colour`: flat with noise, stripes of two shades, or a gradient.

    Objects and background share this function, so no texture or colour marks a class.
    """
    size = yy.shape[0]
    kind = rng.integers(3)
    if kind == 0:
        tex = np.broadcast_to(colour, yy.shape + (3,)).copy()
    elif kind == 1:
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(3.0, 6.0)
        phase = np.cos(angle) * xx + np.sin(angle) * yy
        stripe = (np.floor(phase / period) % 2)[..., None]
        other = np.clip(colour + rng.uniform(-0.3, 0.3, size=3), 0, 1)
        tex = stripe * colour + (1 - stripe) * other
    else:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = ((np.cos(angle) * xx + np.sin(angle) * yy) / size)[..., None]
        other = np.clip(colour + rng.uniform(-0.4, 0.4, size=3), 0, 1)
        tex = colour + ramp * (other - colour)
    tex = tex + rng.normal(0, rng.uniform(0.0, 0.06), size=tex.shape)
    return tex


def _shape_mask(kind, yy, xx, cy, cx, r, angle):
    """Boolean HxW mask of one shape; kinds are 1 disc, 2 square, 3 triangle, 4 ring."""
    dy, dx = yy - cy, xx - cx
    if kind == 1:
        return dx**2 + dy**2 <= r**2
    if kind == 4:
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.5 * r) ** 2)
    if kind == 2:
        # Half-side 0.88 r gives about the disc's area.
        u = np.cos(angle) * dx + np.sin(angle) * dy
        v = -np.sin(angle) * dx + np.cos(angle) * dy
        return (np.abs(u) <= 0.88 * r) & (np.abs(v) <= 0.88 * r)
    if kind == 3:
        # Equilateral triangle with circumradius R: inside all three half-planes at distance R/2.
        circumradius = 1.5 * r
        inside = np.ones(yy.shape, dtype=bool)
        for k in range(3):
            a = angle + 2 * np.pi * k / 3
            inside &= np.cos(a) * dx + np.sin(a) * dy <= circumradius / 2
        return inside
    raise ValueError(f"unknown shape kind {kind}; expected 1..{_NUM_KINDS}")


def render_scene(rng, image_size, top_kind=None):
    """One scene: (uint8 HxWx3 image, uint8 HxW label).

    `top_kind` (1..4), when given, is the kind of the last object drawn, which is therefore never
    occluded; cycling it over a split guarantees every class shows up in small labelled splits.
    """
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64) + 0.5
    bg_colour = _random_colour(rng)
    image = _texture(rng, yy, xx, bg_colour)
    label = np.zeros((image_size, image_size), dtype=np.uint8)

    num_objects = rng.integers(1, 5)
    kinds = rng.integers(1, _NUM_KINDS + 1, size=num_objects)
    if top_kind is not None:
        kinds[-1] = top_kind
    placed = []
    for kind in kinds:
        r = rng.uniform(0.15, 0.25) * image_size
        # A few tries to keep objects from covering each other almost entirely; overlap is allowed.
        for _ in range(20):
            cy, cx = rng.uniform(0.8 * r, image_size - 0.8 * r, size=2)
            if all((cy - py) ** 2 + (cx - px) ** 2 >= (0.8 * (r + pr)) ** 2 for py, px, pr in placed):
                break
        placed.append((cy, cx, r))
        # Keep the object distinguishable from the background it sits on.
        colour = _random_colour(rng)
        while np.abs(colour - bg_colour).max() < 0.3:
            colour = _random_colour(rng)
        mask = _shape_mask(kind, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
        image[mask] = _texture(rng, yy, xx, colour)[mask]
        label[mask] = kind

    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image, label


def _write_split(folder, split, count, image_size, seed, with_labels):
    os.makedirs(folder)
    for i in range(count):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
        top_kind = 1 + i % _NUM_KINDS if with_labels else None
        image, label = render_scene(rng, image_size, top_kind)
        stem = os.path.join(folder, f"{i:05d}")
        Image.fromarray(image).save(stem + ".png")
        if with_labels:
            np.save(stem + ".npy", label)


def _dataset_paths(root):
    return {
        "root": root,
        "train": os.path.join(root, "real", "train"),
        "test": os.path.join(root, "real", "test"),
        "val": os.path.join(root, "real", "val"),
        "unlabelled": os.path.join(root, "unlabelled"),
        "manifest": os.path.join(root, MANIFEST_NAME),
    }


def _read_manifest(root):
    try:
        with open(os.path.join(root, MANIFEST_NAME)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def generate_demo_dataset(root, image_size=32, num_pool=4000, num_train=20, num_test=50, num_val=50, seed=0):
    """Write the demo dataset under `root` (see module doc) and return its paths.

    Returns a dict with keys root, train, test, val, unlabelled, manifest. Idempotent: when `root`
    already holds a complete dataset made with the same parameters it is left untouched. The data
    is built in a temporary folder beside `root` and renamed into place, so `root` is either
    absent or complete. A `root` holding anything other than an earlier demo dataset is refused.
    """
    for name, value, low in [("image_size", image_size, 8), ("num_pool", num_pool, 0),
                             ("num_train", num_train, 1), ("num_test", num_test, 1), ("num_val", num_val, 1)]:
        if int(value) != value or value < low:
            raise ValueError(f"generate_demo_dataset: {name}={value!r}, expected an integer >= {low}")
    root = os.path.abspath(root)
    paths = _dataset_paths(root)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "image_size": image_size,
        "num_pool": num_pool,
        "num_train": num_train,
        "num_test": num_test,
        "num_val": num_val,
        "seed": seed,
        "class_names": DEMO_CLASS_NAMES,
        "palette": DEMO_PALETTE,
    }
    if _read_manifest(root) == manifest:
        return paths
    if os.path.isdir(root) and os.listdir(root) and _read_manifest(root) is None:
        raise ValueError(f"{root} exists and is not a demo dataset (no {MANIFEST_NAME}); "
                         "expected an empty or missing folder")

    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
    try:
        tmp_paths = _dataset_paths(tmp)
        _write_split(tmp_paths["train"], "train", num_train, image_size, seed, with_labels=True)
        _write_split(tmp_paths["test"], "test", num_test, image_size, seed, with_labels=True)
        _write_split(tmp_paths["val"], "val", num_val, image_size, seed, with_labels=True)
        _write_split(tmp_paths["unlabelled"], "unlabelled", num_pool, image_size, seed, with_labels=False)
        with open(tmp_paths["manifest"], "w") as f:
            json.dump(manifest, f, indent=1)
        # An older demo dataset (other parameters) is moved aside first: rename cannot replace
        # a non-empty folder.
        old = None
        if os.path.isdir(root) and os.listdir(root):
            old = tempfile.mkdtemp(prefix=os.path.basename(root) + ".old-", dir=parent)
            os.replace(root, os.path.join(old, "data"))
        elif os.path.isdir(root):
            os.rmdir(root)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process finished the same dataset first; keep theirs if it matches.
            if _read_manifest(root) != manifest:
                raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
