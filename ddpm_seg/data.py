"""Images and labels: one image reader for every command, and labelled folders in the official layout
(images found recursively, a `<stem>.npy` label beside each) or with PNG masks in a `labels/` folder."""

import os
import sys
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .class_info import class_table

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# PNG masks live in <folder>/labels/, mirroring the images' relative paths: <folder>/labels/a/b.png labels
# <folder>/a/b.jpg. Nothing under that folder is ever taken for an image.
MASK_FOLDER = "labels"
# The paper's rule for training images: a class covering fewer pixels than this in an image is
# treated as unlabelled there (too few pixels to be a reliable annotation).
MIN_CLASS_PIXELS = 20


@dataclass
class LabelledImage:
    path: str
    image: np.ndarray  # uint8 [H, W, 3], resized to the experiment resolution
    label: np.ndarray  # int64 [H, W], resized with nearest neighbour


def is_hidden(name: str) -> bool:
    """Hidden files and folders, among them macOS's `._*` resource forks (not images, though named *.jpg)."""
    return name.startswith(".")


def list_images(folder: str) -> list:
    """Images under `folder` (recursive, sorted), without hidden files and without the masks folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_hidden(d) and not (root == folder and d == MASK_FOLDER)]
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not is_hidden(f)]
    return sorted(found)


def _to_8bit(values: np.ndarray, path: str) -> np.ndarray:
    """Integer grey levels of a 16-bit (or 32-bit integer) image -> uint8, scaling 0..65535 onto 0..255 with
    rounding (v * 257 -> v), so a 16-bit copy of an 8-bit image reads as that image."""
    if values.min() < 0 or values.max() > 65535:
        raise ValueError(f"cannot read image {path!r}: integer pixel values {values.min()}..{values.max()} "
                         "outside the 16-bit range")
    return np.round(values.astype(np.float64) / 257).astype(np.uint8)


def image_to_rgb(im: Image.Image, path: str = "<image>") -> np.ndarray:
    """A PIL image as the uint8 [H, W, 3] a person sees when opening it.

    The EXIF orientation is applied (labels are drawn on the displayed photo). 16-bit grey levels are scaled
    to 8 bits (Pillow's convert("RGB") would clip them to white); 16-bit RGB(A) PNGs Pillow already reads at
    8 bits. Palette, grey, 1-bit, CMYK and YCbCr images are converted to their colours. Transparency
    (LA, RGBA, PA, palette or grey with a transparent entry) is composited over black: the colour under
    a fully transparent pixel is arbitrary (editors store anything there), black is one fixed answer.
    """
    frames = getattr(im, "n_frames", 1)
    if frames > 1:  # reading only the first frame would silently drop the rest
        raise ValueError(f"cannot read image {path!r}: it holds {frames} frames (animated or multi-page); save each "
                         "frame as its own image")
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return np.repeat(_to_8bit(np.asarray(im), path)[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise ValueError(f"cannot read image {path!r}: floating-point pixels (mode F) have no defined 0..255 range")
    if im.mode in ("LA", "PA", "La", "RGBa") or "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        rgba = np.asarray(im).astype(np.uint16)
        return ((rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255).astype(np.uint8)
    return np.asarray(im.convert("RGB"))


# What Pillow raises for a file it cannot read as an image; DecompressionBombError: a header claiming more pixels
# than Pillow's safety limit (its message says how many).
UNREADABLE_IMAGE = (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError)


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] of the image file at `path` (see image_to_rgb); an unreadable file is a ValueError
    naming it."""
    try:
        with Image.open(path) as im:
            return image_to_rgb(im, path)
    except UNREADABLE_IMAGE as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from None


def readable_paths(paths: list) -> list:
    """The paths whose image header Pillow reads (a known format, a size within the decompression-bomb limit);
    the others are named on stderr and left out. Pixels are not decoded, so a large folder is checked quickly."""
    kept = []
    for path in paths:
        try:
            with Image.open(path):
                kept.append(path)
        except UNREADABLE_IMAGE as e:
            print(f"skipped {path!r}: {e}", file=sys.stderr)
    return kept


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


def label_paths(image_path: str, folder: str) -> tuple:
    """The two places a label of `image_path` (an image under `folder`) may be: <stem>.npy beside it, or
    <folder>/labels/<relative path of the image, extension .png>."""
    stem = os.path.splitext(image_path)[0]
    return stem + ".npy", os.path.join(folder, MASK_FOLDER, os.path.relpath(stem, folder) + ".png")


def colours_to_ids(rgb: np.ndarray, palette: np.ndarray, path: str) -> np.ndarray:
    """Colour mask uint8 [H, W, 3] -> class ids [H, W] through palette [K, 3]; a colour outside the palette
    is an error naming it and its pixel count."""
    if palette is None:
        raise ValueError(f"mask {path!r} is a colour (RGB) mask; reading it needs the experiment's palette")
    palette = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    palette_codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    colours, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    ids = np.empty(len(colours), dtype=np.int64)
    for i, code in enumerate(colours):
        matches = np.flatnonzero(palette_codes == code)
        colour = (int(code >> 16) & 255, int(code >> 8) & 255, int(code) & 255)
        if matches.size == 0:
            raise ValueError(f"mask {path!r}: colour {colour} ({counts[i]} pixels) is not in the experiment's "
                             f"palette {[tuple(int(v) for v in c) for c in palette]}")
        if matches.size > 1:
            raise ValueError(f"mask {path!r}: colour {colour} is the palette colour of classes {matches.tolist()}; "
                             "give the classes distinct colours in the config's 'palette' or use a class-id mask")
        ids[i] = matches[0]
    return ids[inverse].reshape(codes.shape)


def read_mask(path: str, palette=None) -> np.ndarray:
    """Class ids [H, W] (int64) of a PNG mask: single-channel (grey, 1-bit or 16-bit) values are the ids, a
    palette image's indices are the ids, an RGB(A) image's colours map through the experiment's palette."""
    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "LA", "PA"):
                alpha = np.asarray(im.getchannel("A"))
                if alpha.min() < 255:
                    raise ValueError(f"mask {path!r} has {int((alpha < 255).sum())} (partly) transparent pixels; "
                                     "a mask must be opaque (mark unlabelled pixels with ignore_label in an id mask)")
            if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
                return colours_to_ids(np.asarray(im.convert("RGB")), palette, path)
            values = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read mask {path!r}: {e}") from None
    return values[:, :, 0] if values.ndim == 3 else values  # LA / PA: the grey level or palette index


def read_label(image_path: str, folder: str, image_shape, number_class: int, ignore_label: int,
               palette=None) -> np.ndarray:
    """The label of an image under `folder` at the image's size: <stem>.npy beside it or a PNG mask in
    <folder>/labels/ (exactly one of them), with every value a class id or ignore_label."""
    npy_path, mask_path = label_paths(image_path, folder)
    has_npy, has_mask = os.path.isfile(npy_path), os.path.isfile(mask_path)
    if has_npy and has_mask:
        raise ValueError(f"image {image_path!r} has two labels, {npy_path!r} and {mask_path!r}; keep one")
    if not (has_npy or has_mask):
        raise FileNotFoundError(f"label {npy_path!r} for image {image_path!r} does not exist, nor the PNG mask "
                                f"{mask_path!r}")
    if has_mask:
        label_path, label = mask_path, read_mask(mask_path, palette)
    else:
        label_path = npy_path
        try:
            label = np.load(npy_path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"cannot read label {npy_path!r}: {e}") from None
        if not isinstance(label, np.ndarray):  # np.load reads by content: an .npz archive saved under a .npy name
            files = label.files
            label.close()
            raise ValueError(f"label {npy_path!r} is an .npz archive (arrays {files}); expected one array saved "
                             "with np.save")
    if label.ndim != 2 or label.shape != tuple(image_shape[:2]):
        raise ValueError(
            f"label {label_path!r} has shape {label.shape} but its image {image_path!r} is {tuple(image_shape[:2])}"
            " (after its EXIF orientation)"
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


def small_classes(label: np.ndarray, number_class: int, ignore_label: int) -> dict:
    """{class id: pixels} of the classes covering 1..MIN_CLASS_PIXELS-1 pixels of `label`."""
    counts = np.bincount(label[label != ignore_label].ravel(), minlength=number_class)
    return {int(c): int(counts[c]) for c in np.flatnonzero((counts > 0) & (counts < MIN_CLASS_PIXELS))}


def drop_small_classes(label: np.ndarray, number_class: int, ignore_label: int) -> np.ndarray:
    """Classes covering 1..MIN_CLASS_PIXELS-1 pixels become ignore_label (the paper's rule for training images)."""
    small = small_classes(label, number_class, ignore_label)
    if small:
        label = label.copy()
        label[np.isin(label, list(small))] = ignore_label
    return label


def check_unique_stems(paths: list) -> None:
    """Two images with one stem in one folder would share a label: most often a PNG mask saved beside its
    JPEG, which would otherwise be trained on as an image."""
    seen = {}
    for path in paths:
        stem = os.path.splitext(path)[0]
        if stem in seen:
            raise ValueError(f"{seen[stem]!r} and {path!r} share the stem {os.path.basename(stem)!r}, so they would "
                             f"share one label; if one is a mask, move it to the {MASK_FOLDER}/ folder at the top "
                             "of the image folder (see docs/commands.md, Labels and images)")
        seen[stem] = path


def load_labelled_folder(folder: str, number: int, size, number_class: int, ignore_label: int,
                         drop_small: bool = False, palette=None) -> list:
    """The first `number` images of `folder` (sorted) with their labels, resized to `size` = (H, W).
    `palette` [K, 3] maps colour masks to class ids."""
    paths = list_images(folder)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder!r}")
    check_unique_stems(paths)
    items, stretched, skipped = [], [], []
    for path in paths:
        if len(items) == number:
            break
        try:
            image = read_image(path)
        except ValueError as e:  # one unreadable image is named and left out, the next one takes its place
            print(f"skipped {e}", file=sys.stderr)
            skipped.append(str(e))
            continue
        label = read_label(path, folder, image.shape, number_class, ignore_label, palette)
        if image.shape[0] * size[1] != image.shape[1] * size[0]:
            stretched.append(f"{os.path.relpath(path, folder)} ({image.shape[1]}x{image.shape[0]})")
        label = resize_label(label, size)
        if drop_small:
            small = small_classes(label, number_class, ignore_label)
            if small:  # the paper's rule, said per file so that no labelled class disappears without a word
                print(f"{path}: {', '.join(f'class {c} has {n} pixels' for c, n in small.items())} at "
                      f"{size[1]}x{size[0]}, fewer than {MIN_CLASS_PIXELS}: ignored in training (the paper's rule)",
                      file=sys.stderr)
                label = drop_small_classes(label, number_class, ignore_label)
        items.append(LabelledImage(path, resize_image(image, size), label))
    if skipped and not items:
        raise ValueError(f"no readable images under {folder!r}: {skipped[0]}")
    if len(items) < number:
        unreadable = f" ({len(skipped)} unreadable)" if skipped else ""
        warnings.warn(f"{folder!r} has {len(items)} readable images{unreadable}, fewer than the {number} requested; "
                      "using all of them")
    if stretched:
        print(f"{folder}: {len(stretched)} of {len(items)} images are not in the {size[1]}x{size[0]} shape of the "
              f"experiment and are stretched to it (e.g. {stretched[0]}); crop or pad them first to keep their "
              "proportions", file=sys.stderr)
    return items


def load_split(cfg, split: str) -> list:
    """The first N labelled images of the "train" or "test" folder, resized to dim[:2]; training labels get
    the paper's small-class rule."""
    key = {"train": "training", "test": "testing"}[split]
    return load_labelled_folder(getattr(cfg, f"{key}_path"), getattr(cfg, f"{key}_number"), tuple(cfg.dim[:2]),
                                cfg.number_class, cfg.ignore_label, drop_small=split == "train",
                                palette=class_table(cfg)[1])


def synthetic_dataset_path(out_dir: str, image_size) -> str:
    """Where generate-dataset writes a DatasetDDPM and train-deeplab looks for it by default."""
    return os.path.join(out_dir, f"samples_{image_size[0]}x{image_size[1]}x3.npz")
