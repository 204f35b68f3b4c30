"""The interpreter: a backbone's feature extractor and a trained pixel-classifier ensemble, which segments
images of any size. train-interpreter's evaluation, generate-dataset, sweep, the demo and predict all
segment through it.

An image is resized to the experiment's resolution (dim[:2]) for its features, the ensemble's logits are
computed there (predict_logits), then upsampled bilinearly to the image's own size before the members vote,
so the mask matches the input pixel for pixel. At the experiment's resolution nothing is resampled: the
labels are those train-interpreter's evaluation writes.

With the config's `test_views` V > 1 the image is also read flipped and turned (VIEWS), each view with its own
noise draws; each member's logits are turned back and its probabilities averaged over the V views before the
members vote. The members are the same: only reading the image several ways changes.

    interp = Interpreter.load("pixel_classifiers/demo/ddpm/50_150_250_0_1_2_3_4_5_6_7/seed_0")
    labels, uncertainty, score = interp(Image.open("photo.jpg"))
"""

import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbones import (EXTRACT_DTYPES, backbone, create_feature_extractor, extract_batch_size, extract_batches,
                        memory_per_image)
from .class_info import class_table
from .config import validate_experiment
from .data import image_to_rgb, read_image, resize_image
from .device import resolve_device
from .ensemble import MLPEnsemble, predict_logits
from .evaluate import ConfusionMatrix, image_uncertainty_score, iou_metrics, majority_vote, uncertainty_map
from .files import atomic_save_npy, read_json_object
from .fingerprint import path_sha256, short
from .progress import progress_bar
from .visualize import save_mask_png, save_prediction_picture, save_segmentation_picture

SETTINGS_NAME = "settings.json"
# Test views as (quarter turns, then a left-right flip): identity, left-right flip, top-bottom flip, half turn
# (these four keep any image's shape), then the quarter turns, flipped or not (square resolutions only).
VIEWS = [(0, False), (0, True), (2, True), (2, False), (1, False), (1, True), (3, False), (3, True)]
# Logit values (members x classes x pixels) upsampled at once: a large photo is voted band by band of rows,
# so its full-size logits (10 x 34 x 12 M pixels = 16 GB for a 4000 x 3000 photo) never exist whole.
BAND_VALUES = 2**25


def member_path(folder, m):
    return os.path.join(folder, f"model_{m}.pth")


def load_ensemble(cfg, folder, seed, device):
    """The cfg.model_num members model_{i}.pth of `folder`, in eval mode."""
    ensemble = MLPEnsemble(cfg.dim[-1], cfg.number_class, cfg.model_num, seed=seed).to(device)
    for m in range(cfg.model_num):
        path = member_path(folder, m)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pixel classifier {path!r} does not exist; train the ensemble first "
                                    "(ddpm-seg train-interpreter --exp <this config>) or pass --run_dir")
        ensemble.load_member(path, m)
    return ensemble.eval()


def check_checkpoint(settings, cfg, source):
    """Refuse a backbone checkpoint other than the one the members were trained on (settings.json's
    "model_sha256"; folders that predate the key are not checked): its features would give other labels."""
    recorded = settings.get("model_sha256")
    if settings.get("random_init") or recorded is None:
        return
    found = path_sha256(cfg.model_path)
    if found is not None and found != recorded:
        raise ValueError(f"{source}: the members were trained on the features of a checkpoint with sha256 "
                         f"{short(recorded)}, but {cfg.model_path} has {short(found)}; pass the checkpoint "
                         "they were trained with")


def recorded_extract_dtype(settings, source):
    """The --extract_dtype name a run folder's features were made in (settings.json's "extract_dtype"); fp32
    for folders that predate the key (their evaluation extracted in float32)."""
    name = settings.get("extract_dtype", "fp32")
    if name not in EXTRACT_DTYPES:
        raise ValueError(f"{source}: extract_dtype must be one of {sorted(EXTRACT_DTYPES)}, got {name!r}")
    return name


def run_extract_dtype(run_dir, requested):
    """--extract_dtype for a command that segments with the members of `run_dir`: `requested` unless it is
    "auto", then the precision the run was evaluated in (its settings.json), so that the command writes the
    labels the evaluation wrote. A folder without settings.json keeps "auto"."""
    path = os.path.join(run_dir, SETTINGS_NAME)
    if requested != "auto" or not os.path.isfile(path):
        return requested
    return recorded_extract_dtype(read_json_object(path, "run settings"), path)


def as_rgb(image) -> np.ndarray:
    """An image file's path (str or os.PathLike; read_image, whose errors name the file), a PIL image (any
    mode, EXIF orientation applied) or a uint8 array [H, W, 3] -> uint8 [H, W, 3]."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))
    if isinstance(image, Image.Image):
        return image_to_rgb(image)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a PIL image or a uint8 array [H, W, 3], got {image.dtype} {image.shape}")
    return image


def upsample_rows(logits, size, start, stop):
    """Rows start..stop-1 of F.interpolate(logits, size, mode="bilinear", align_corners=False), made from
    the source rows they need only: [M, C, stop - start, W]."""
    h = logits.shape[2]
    rows = torch.arange(start, stop, dtype=torch.float64, device=logits.device)
    # The source coordinate of align_corners=False, clamped at the top edge as PyTorch does.
    source = ((rows + 0.5) * (h / size[0]) - 0.5).clamp(min=0)
    top = source.floor().long().clamp(max=h - 1)
    below = (top + 1).clamp(max=h - 1)
    weight = (source - top).to(logits.dtype)[:, None]
    band = logits[:, :, top] * (1 - weight) + logits[:, :, below] * weight
    # Same number of rows in and out: this interpolates along the width only.
    return F.interpolate(band, size=(stop - start, size[1]), mode="bilinear", align_corners=False)


def view_image(image, view):
    """uint8 [H, W, 3] as test view `view` sees it (VIEWS)."""
    turns, flip = VIEWS[view]
    image = np.rot90(image, turns, axes=(0, 1))
    return np.ascontiguousarray(image[:, ::-1] if flip else image)


def unview_logits(logits, view):
    """Logits [M, C, h, w] of test view `view` turned back to the image's own orientation."""
    turns, flip = VIEWS[view]
    return torch.rot90(logits.flip(-1) if flip else logits, -turns, dims=(-2, -1))


def segment_logits(logits, size, uncertainty=uncertainty_map):
    """(labels uint8 [H, W], uncertainty float32 [H, W], score) from members' logits [M, C, h, w] upsampled
    to size = (H, W): the majority vote, a per-pixel uncertainty and the mean of its top 10%."""
    num_members, num_classes, h, w = logits.shape
    height, width = size
    labels = np.empty((height, width), dtype=np.uint8)
    unc = np.empty((height, width), dtype=np.float32)
    step = max(1, BAND_VALUES // (width * num_members * num_classes))
    for start in range(0, height, step):
        stop = min(height, start + step)
        band = logits[:, :, start:stop] if (h, w) == (height, width) else upsample_rows(logits, size, start, stop)
        labels[start:stop] = majority_vote(band).cpu().numpy()
        unc[start:stop] = uncertainty(band).cpu().numpy()
    return labels, unc, image_uncertainty_score(torch.from_numpy(unc))


def segment_maps(ensemble, maps, resolution, size):
    """Segment one image from its feature maps: logits at the experiment's resolution (h, w), upsampled to
    the image's size (H, W) for the vote. Returns (labels, uncertainty, score) as segment_logits."""
    return segment_logits(predict_logits(ensemble, maps, resolution), size)


class Interpreter:
    """Segments images with a feature extractor and a trained ensemble; class names and palette come along."""

    def __init__(self, cfg, extractor, ensemble, extract_batch=None):
        if cfg.number_class > 256:
            raise ValueError(f"number_class {cfg.number_class} > 256: labels are written as uint8 ids")
        self.cfg, self.extractor, self.ensemble = cfg, extractor, ensemble
        self.class_names, self.palette = class_table(cfg)
        self.number_class, self.ignore_label = cfg.number_class, cfg.ignore_label
        self.resolution = tuple(cfg.dim[:2])
        self.extract_batch = extract_batch  # images per backbone forward; None: batch_size() chooses
        self.views = cfg.test_views

    @classmethod
    def build(cls, cfg, model_flags, run_folder, seed, random_init=False, device="auto", extract_dtype="auto",
              extract_batch=None, extractor=None, config_path=None):
        """The one way an Interpreter is made: the backbone `cfg` names (or `extractor`, already built from it
        with this seed) and the cfg.model_num members model_{i}.pth saved in `run_folder`. train-interpreter's
        evaluation, generate-dataset and load() (predict, the Python API) all come here."""
        device = resolve_device(device)
        if extractor is None:
            extractor = create_feature_extractor(cfg, model_flags, device, seed=seed, random_init=random_init,
                                                 config_path=config_path, dtype=extract_dtype)
        return cls(cfg, extractor, load_ensemble(cfg, run_folder, seed, device), extract_batch)

    @property
    def device(self):
        return next(self.ensemble.parameters()).device

    @property
    def backbone_network(self):
        """The backbone's network (a DDPM's UNet: generate-dataset samples from it)."""
        return self.extractor.model

    def batch_size(self) -> int:
        """Images per backbone forward: extract_batch, else as many as a quarter of the free memory holds (1
        until the extractor has seen an image and knows its memory per image; always 1 on CPU)."""
        return extract_batch_size(self.extract_batch, memory_per_image(self.extractor), self.device)

    @classmethod
    def load(cls, run_dir, model_path=None, device="auto", extract_dtype=None, extract_batch=None):
        """The interpreter of a train-interpreter run folder (.../seed_<N>/): its settings.json holds the
        config, the model flags, the seed, random_init and the backbone's precision; model_{i}.pth the
        members. `model_path` replaces the backbone checkpoint path recorded there (a run folder copied to
        another machine). The backbone computes in the precision the run's evaluation used (so an image gets
        the labels the evaluation wrote, whatever this CPU would choose by itself), unless `extract_dtype`
        names another (an --extract_dtype name). extract_batch: images per backbone forward (see batch_size)."""
        path = os.path.join(run_dir, SETTINGS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{run_dir!r} is not a train-interpreter run folder: it has no {SETTINGS_NAME}")
        settings = read_json_object(path, "run settings")
        missing = sorted({"config", "model_flags", "random_init"} - set(settings))
        if missing:
            raise ValueError(f"{path}: lacks {missing}; was it written by train-interpreter?")
        cfg = validate_experiment(settings["config"], path)
        seed = settings.get("seed")
        if seed is None:  # folders written before the seed was recorded are named after it
            match = re.fullmatch(r"seed_(\d+)", os.path.basename(os.path.normpath(run_dir)))
            if match is None:
                raise ValueError(f"{path}: records no seed and the folder is not named seed_<N>")
            seed = int(match.group(1))
        if model_path is not None:
            cfg = cfg.replace(model_path=model_path)
        # A diffusers model_path may be a hub id: that backbone resolves it and says what is missing.
        if (not settings["random_init"] and not backbone(cfg.model_type).hub_model
                and not os.path.exists(cfg.model_path)):
            raise FileNotFoundError(f"{path}: the backbone checkpoint {cfg.model_path!r} it was trained with does "
                                    "not exist here; pass its path (--model_path, or Interpreter.load(..., model_path=))")
        check_checkpoint(settings, cfg, path)
        return cls.build(cfg, settings["model_flags"], run_dir, seed, settings["random_init"], device,
                         extract_dtype or recorded_extract_dtype(settings, path), extract_batch)

    def features(self, images, view=0):
        """Feature maps of images already at the experiment's resolution (and in test view `view`): per image, a
        list of [C, h, w]; extract_batch images per backbone forward."""
        per_image = []
        for chunk, maps in extract_batches(self.extractor, images, self.batch_size(), view):
            per_image += [[m[j] for m in maps] for j in range(len(chunk))]
        return per_image

    def logits(self, images):
        """Per image already at the experiment's resolution, the members' logits [M, C, h, w]; with test views,
        the log of each member's probabilities averaged over the views."""
        if self.views == 1:
            return [predict_logits(self.ensemble, maps, self.resolution) for maps in self.features(images)]
        probs = [0] * len(images)
        for view in range(self.views):
            maps = self.features([view_image(image, view) for image in images], view)
            for i, image_maps in enumerate(maps):
                logits = unview_logits(predict_logits(self.ensemble, image_maps, self.resolution), view)
                probs[i] = probs[i] + logits.softmax(dim=1)
        # Floored at the smallest normal float: a log of 0 would turn into NaN where the vote upsamples.
        return [(p / self.views).clamp_min(torch.finfo(p.dtype).tiny).log() for p in probs]

    def segment(self, images):
        """[(labels uint8 [H, W], uncertainty float32 [H, W], score)] for a list of images (file paths, PIL
        images or uint8 arrays [H, W, 3]) of any sizes; each result at its image's size."""
        if isinstance(images, (str, os.PathLike)):
            raise TypeError(f"segment takes a list of images, got the path {images!r}; segment one image with "
                            "interpreter(path)")
        images = [as_rgb(image) for image in images]
        logits = self.logits([resize_image(image, self.resolution) for image in images])
        return [segment_logits(image_logits, image.shape[:2]) for image, image_logits in zip(images, logits)]

    def __call__(self, image):
        """(labels uint8 [H, W], uncertainty float32 [H, W] in nats, score) for one image: a file path, a PIL
        image or a uint8 array [H, W, 3]."""
        return self.segment([image])[0]

    @property
    def uncertainty_max(self) -> float:
        """The largest uncertainty a pixel can have, in nats: ln(min(members, classes)), the mutual information
        when each member is sure of its class and the members split evenly over min(members, classes) classes.
        Pictures scale their uncertainty colours from 0 to it, so that a colour means one value in every
        picture of a run."""
        return math.log(min(self.ensemble.num_members, self.number_class))

    def save_mask(self, path, labels) -> None:
        """Write labels (class ids [H, W], as segment returns them) as a palette-indexed PNG: each pixel's
        value is its class id (np.asarray(Image.open(path)) gives the ids back), shown in the experiment's
        colours."""
        save_mask_png(path, labels, self.palette)

    def save_overlay(self, path, image, labels, uncertainty=None) -> None:
        """Write a PNG to read at a glance: image | mask | overlay (| uncertainty), enlarged when small, with the
        class names and colours below (visualize.save_segmentation_picture). image: what segment takes;
        labels and uncertainty as segment returns them for it. The uncertainty colour bar runs from 0 to
        uncertainty_max, the same for every image."""
        save_segmentation_picture(path, as_rgb(image), labels, self.palette, self.class_names,
                                  uncertainty=uncertainty, uncertainty_max=self.uncertainty_max)


def evaluate(interpreter, items, folder, pictures=True):
    """Segment labelled items (at the experiment's resolution), write predictions/<stem>.npy (and .png
    pictures) in `folder`, return the metrics: mIoU, per-class IoU, uncertainty scores. Afterwards
    predictions/ holds this evaluation's files only (those of an earlier evaluation on other images go)."""
    matrix = ConfusionMatrix(interpreter.number_class, interpreter.ignore_label)
    scores = []
    stems = prediction_stems(items)
    bar = progress_bar(total=len(items), desc="evaluate")
    start = 0
    while start < len(items):
        chunk = items[start:start + interpreter.batch_size()]
        for k, (pred, unc, score) in enumerate(interpreter.segment([it.image for it in chunk])):
            evaluate_one(interpreter, chunk[k], stems[start + k], pred, unc, matrix, folder, pictures)
            scores.append(score)
        bar.update(len(chunk))
        start += len(chunk)
    bar.close()
    kept = {stem + ext for stem in stems for ext in ([".npy", ".png"] if pictures else [".npy"])}
    predictions = os.path.join(folder, "predictions")
    for name in os.listdir(predictions):
        if name.endswith((".npy", ".png")) and name not in kept:
            os.remove(os.path.join(predictions, name))
    return {
        **iou_metrics(matrix, interpreter.class_names, interpreter.ignore_label),
        "mean_uncertainty": float(np.mean(scores)),
        "uncertainty_scores": scores,
        "num_test_images": len(items),
    }


def prediction_stems(items) -> list:
    """Each item's file name under predictions/: its path below the items' common folder, "/" as "__"; two
    items with one name are refused."""
    root = os.path.commonpath([os.path.dirname(it.path) for it in items])
    stems, owner = [], {}
    for item in items:
        stem = os.path.splitext(os.path.relpath(item.path, root))[0].replace(os.sep, "__")
        if stem in owner:
            raise ValueError(f"{owner[stem]!r} and {item.path!r} would both be saved as predictions/{stem}.npy; "
                             "rename one of them")
        owner[stem] = item.path
        stems.append(stem)
    return stems


def evaluate_one(interpreter, item, stem, pred, unc, matrix, folder, pictures):
    """Count one test image's prediction in `matrix` and save it (and its picture) under folder/predictions."""
    matrix.update(pred, item.label)
    atomic_save_npy(os.path.join(folder, "predictions", stem + ".npy"), pred)
    if pictures:
        save_prediction_picture(os.path.join(folder, "predictions", stem + ".png"), item.image, item.label,
                                pred, unc, interpreter.palette, interpreter.ignore_label, interpreter.class_names,
                                uncertainty_max=interpreter.uncertainty_max,
                                scale=max(1, 128 // min(item.label.shape)))
