"""convert-labels: a labelled folder with PNG masks -> the official layout (<stem>.npy beside each image),
for the original ddpm-segmentation code, which reads only .npy labels.

Every image under --input (recursive; hidden files and the labels/ folder skipped) must have one label,
<stem>.npy beside it or a PNG mask labels/<relative path>.png (class ids, palette indices or colours of
the experiment's palette). Written under --out at the image's relative path:
    the image: copied unchanged when the original's Image.open(path).convert("RGB") reads the same pixels
        as ours; otherwise (EXIF-rotated JPEG, 16-bit or transparent PNG) our reading as an 8-bit RGB PNG
    <stem>.npy: the class ids, uint8 when they fit (as the paper's datasets), else int64
"""

import argparse
import os
import shutil

import numpy as np
from PIL import Image

from ..class_info import class_table
from ..config import load_experiment
from ..data import check_unique_stems, list_images, read_image, read_label
from ..files import atomic_path, atomic_save_npy


def original_reading(path: str):
    """The pixels the original code sees: PIL's plain convert("RGB"), no EXIF orientation."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def convert_labels(exp: str, folder: str, out: str) -> int:
    """Write the official layout of `folder` into `out`; returns the number of images written."""
    cfg = load_experiment(exp)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--input {folder!r} is not a folder")
    inside = os.path.realpath(out) + os.sep
    if (os.path.realpath(folder) + os.sep).startswith(inside) or inside.startswith(os.path.realpath(folder) + os.sep):
        raise ValueError(f"--out {out!r} must lie outside --input {folder!r} (and not contain it)")
    paths = list_images(folder)
    if not paths:
        raise FileNotFoundError(f"no images found under {folder!r}")
    check_unique_stems(paths)
    _, palette = class_table(cfg)
    # Every label is read and checked before anything is written.
    labels = [read_label(p, folder, read_image(p).shape, cfg.number_class, cfg.ignore_label, palette)
              for p in paths]
    for path, label in zip(paths, labels):
        target = os.path.join(out, os.path.relpath(path, folder))
        image = read_image(path)
        if np.array_equal(image, original_reading(path)):
            with atomic_path(target) as tmp:
                shutil.copyfile(path, tmp)
        else:
            target = os.path.splitext(target)[0] + ".png"
            with atomic_path(target) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
        fits = label.min() >= 0 and label.max() <= 255
        atomic_save_npy(os.path.splitext(target)[0] + ".npy", label.astype(np.uint8 if fits else np.int64))
    print(f"{len(paths)} images with .npy labels written to {out}")
    return len(paths)


def main(argv):
    parser = argparse.ArgumentParser(prog="ddpm-seg convert-labels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True, help="the experiment config (number_class, ignore_label, palette)")
    parser.add_argument("--input", required=True, help="labelled image folder (PNG masks in its labels/ folder)")
    parser.add_argument("--out", required=True, help="output folder in the official layout")
    args = parser.parse_args(argv)
    convert_labels(args.exp, args.input, args.out)
