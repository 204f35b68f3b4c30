"""Labelled image folders in the official layout: images found recursively, a `<stem>.npy` label beside each."""

import os
import zipfile
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The paper's rule for training images: a class covering fewer pixels than this in an image is
# treated as unlabelled there (too few pixels to be a reliable annotation).
MIN_CLASS_PIXELS = 20


@dataclass
class LabelledImage:
    path: str
    image: np.ndarray  # uint8 [H, W, 3], resized to the experiment resolution
    label: np.ndarray  # int64 [H, W], resized with nearest neighbour


def list_images(folder: str) -> list:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def label_path_for(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + ".npy"


def read_image(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from None


def resize_image(image: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of a uint8 image to (H, W), as torchvision's Resize does on PIL images."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def resize_label(label: np.ndarray, size) -> np.ndarray:
    """Nearest-neighbour resize picking source index floor(dst * in / out), the rule of cv2.INTER_NEAREST
    that the original uses, so resized labels match it pixel for pixel."""
    rows = np.minimum((np.arange(size[0]) * label.shape[0]) // size[0], label.shape[0] - 1)
    cols = np.minimum((np.arange(size[1]) * label.shape[1]) // size[1], label.shape[1] - 1)
    return label[rows[:, None], cols[None, :]]


def read_label(label_path: str, image_path: str, image_shape, number_class: int, ignore_label: int) -> np.ndarray:
    if not os.path.isfile(label_path):
        raise FileNotFoundError(f"label {label_path!r} for image {image_path!r} does not exist (expected <stem>.npy beside the image)")
    try:
        label = np.load(label_path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read label {label_path!r}: {e}") from None
    if not isinstance(label, np.ndarray):  # np.load reads by content: an .npz archive saved under a .npy name
        files = label.files
        label.close()
        raise ValueError(f"label {label_path!r} is an .npz archive (arrays {files}); expected one array saved "
                         "with np.save")
    if label.ndim != 2 or label.shape != tuple(image_shape[:2]):
        raise ValueError(
            f"label {label_path!r} has shape {label.shape} but its image {image_path!r} is {tuple(image_shape[:2])}"
        )
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.mod(label, 1) == 0):
            raise ValueError(f"label {label_path!r} holds non-integer values (dtype {label.dtype})")
    label = label.astype(np.int64)
    bad = np.unique(label[(label != ignore_label) & ((label < 0) | (label >= number_class))])
    if bad.size:
        raise ValueError(
            f"label {label_path!r} has class ids {bad.tolist()[:10]} outside 0..{number_class - 1} "
            f"(ignore_label is {ignore_label})"
        )
    return label


def drop_small_classes(label: np.ndarray, number_class: int, ignore_label: int) -> np.ndarray:
    """Classes covering 1..MIN_CLASS_PIXELS-1 pixels become ignore_label (the paper's rule for training images)."""
    counts = np.bincount(label[label != ignore_label].ravel(), minlength=number_class)
    small = np.flatnonzero((counts > 0) & (counts < MIN_CLASS_PIXELS))
    if small.size:
        label = label.copy()
        label[np.isin(label, small)] = ignore_label
    return label


def load_labelled_folder(folder: str, number: int, size, number_class: int, ignore_label: int,
                         drop_small: bool = False) -> list:
    """The first `number` images of `folder` (sorted) with their labels, resized to `size` = (H, W)."""
    paths = list_images(folder)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder!r}")
    if len(paths) < number:
        warnings.warn(f"{folder!r} has {len(paths)} images, fewer than the {number} requested; using all of them")
    items = []
    for path in paths[:number]:
        image = read_image(path)
        label = read_label(label_path_for(path), path, image.shape, number_class, ignore_label)
        label = resize_label(label, size)
        if drop_small:
            label = drop_small_classes(label, number_class, ignore_label)
        items.append(LabelledImage(path, resize_image(image, size), label))
    return items
