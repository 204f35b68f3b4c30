"""Distillation: an ordinary segmentation network (the student) trained on unlabelled images that a trained
interpreter labels, so that deployment needs neither the diffusion model nor the ensemble. `ddpm-seg distill`
runs it, in one process or as one rank of a torchrun job.

1. Labelling: predict's engine (prediction.segment_inputs) segments every image with the interpreter (in its
   test views when its config has them) into the labels folder: masks/<stem>.png, predictions.csv and the
   journal. Each image is labelled once, by one process; a stopped run resumes image by image.
2. Filter: the paper's DatasetDDPM rule: the uncertainty_portion of the images with the highest uncertainty
   score (the mean of their top 10% pixel uncertainties) is left out.
3. Student: a deeplab.NETWORKS network at `resolution`, trained by deeplab_training.fit (DistributedDataParallel
   under torchrun; resumes from student_last.pth after the last finished epoch). The best validation epoch, or
   the last epoch without validation images, is the student: student.pth + experiment.json.
4. Test: the student segments the experiment's test images exactly as the interpreter's evaluation did (at the
   experiment's resolution, logits upsampled to it): metrics.json beside the interpreter's own mIoU.
"""

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from guided_diffusion.checkpoint import safe_load

from .backbones import image_tensor
from .class_info import class_table
from .data import list_images, load_labelled_folder, load_split, read_image, resize_image, resize_label
from .deeplab import NETWORKS, NetworkSegmenter, build_network, is_student_folder, save_student
from .deeplab_training import SETTINGS_NAME, cpu_state, filter_indices, fit
from .device import distributed
from .evaluate import ConfusionMatrix, iou_metrics
from .files import atomic_torch_save, atomic_write_json, check_settings, check_writable, folder_lock, read_json_object
from .interpreter import Interpreter
from .prediction import PredictOptions, collect_inputs, output_path, run_header, segment_inputs
from .seeding import seed_everything

LAST_NAME = "student_last.pth"
BEST_NAME = "student_best.pth"
# The students' finest output is at 1/8 of their input: a small image is enlarged up to 8x (to at most this) so
# that their output keeps its own resolution (on the 32x32 demo, 256 beat 128 by ~10 mIoU points at equal steps).
STUDENT_RESOLUTION = 256


@dataclass(frozen=True)
class DistillOptions:
    """What distill labels, which student it trains and how: distill's flags, typed, with their defaults."""
    run_dir: str  # the trained interpreter (a train-interpreter seed_<N> folder)
    images: Tuple[str, ...]  # unlabelled image files, folders (recursive) or globs
    out_dir: str  # the student folder
    labels_dir: Optional[str] = None  # where the interpreter's labels go (None: <out_dir>/labels); students may share one
    model_path: Optional[str] = None  # the backbone checkpoint (None: the one the run recorded)
    student: str = "lraspp_mobilenet_v3"  # a deeplab.NETWORKS name
    resolution: int = 0  # the student's input size (0: the config's deeplab_res, else its resolution x8, <= 256)
    backbone_weights: str = ""  # torchvision classification state dict to start the student's backbone from
    max_images: int = 0  # label and learn from the first N images (0: all)
    uncertainty_portion: float = 0.1  # share of the labelled images with the highest uncertainty score left out
    validation_path: Optional[str] = None  # labelled images to pick the epoch (None: the config's, else none)
    seed: int = 0  # the student's initial weights, data order and dropout
    learning_rate: float = 1e-3  # Adam
    batch_size: int = 8  # images per step, per process
    num_epoch: int = 20  # training epochs
    num_workers: int = 2  # DataLoader worker processes
    label_batch_size: int = 1  # images per interpreter call while labelling
    device: str = "auto"  # auto | cpu | cuda[:i] (under torchrun: cuda:LOCAL_RANK)


class LabelledFilesDataset(Dataset):
    """(image path, mask path) pairs read on demand and resized to resolution x resolution (image bilinear and
    ImageNet-normalised [3, R, R], label nearest [R, R] int64)."""

    def __init__(self, pairs, resolution):
        self.pairs, self.size = pairs, (resolution, resolution)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        image_path, mask_path = self.pairs[i]
        image = image_tensor(resize_image(read_image(image_path), self.size), "cpu", "imagenet")[0]
        with Image.open(mask_path) as mask:
            label = resize_label(np.asarray(mask), self.size)
        return image, torch.from_numpy(label.astype(np.int64))


def student_resolution(cfg, requested: int) -> int:
    if requested < 0:
        raise ValueError(f"--resolution must be >= 0 (0: automatic), got {requested}")
    side = max(cfg.dim[:2])
    return requested or cfg.deeplab_res or max(side, min(STUDENT_RESOLUTION, 8 * side))


def check_options(opts: DistillOptions):
    if opts.student not in NETWORKS:
        raise ValueError(f"--student {opts.student!r} is unknown; expected one of {', '.join(NETWORKS)}")
    if not 0 <= opts.uncertainty_portion < 1:
        raise ValueError(f"--uncertainty_portion must lie in [0, 1), got {opts.uncertainty_portion}")
    # torchvision's ASPP pools each image to 1x1 before a batch norm, which needs more than one value to train.
    if opts.batch_size < 2:
        raise ValueError(f"--batch_size must be >= 2 (the students' pooled batch norm), got {opts.batch_size}")
    for key in ("num_epoch", "label_batch_size"):
        if getattr(opts, key) < 1:
            raise ValueError(f"--{key} must be >= 1, got {getattr(opts, key)}")
    if opts.max_images < 0 or opts.num_workers < 0:
        raise ValueError(f"--max_images and --num_workers must be >= 0, got {opts.max_images}, {opts.num_workers}")
    if is_student_folder(opts.run_dir):
        raise ValueError(f"--run_dir {opts.run_dir!r} is a student folder; distill labels with a trained interpreter "
                         "(a train-interpreter run folder, .../seed_<N>)")


def evaluate_segmenter(segmenter, items, batch_size=8) -> ConfusionMatrix:
    """Confusion matrix of the segmenter's labels over labelled items, at the items' size."""
    matrix = ConfusionMatrix(segmenter.number_class, segmenter.ignore_label)
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        labels = [labels for labels, _, _ in segmenter.segment([item.image for item in batch])]
        matrix.update(torch.from_numpy(np.stack(labels)), torch.from_numpy(np.stack([item.label for item in batch])))
    return matrix


def labelling_digest(header_model, rows) -> str:
    """sha256 of what the student learns from: the interpreter (by content) and each kept image's content."""
    kept = [[row["stem"], row["input"][2]] for row in rows]
    return hashlib.sha256(json.dumps([header_model, kept]).encode()).hexdigest()


def distill(opts: DistillOptions) -> dict:
    """Label, filter, train and test (see the module docstring); returns the metrics written to metrics.json
    ({} on every process but rank 0)."""
    check_options(opts)
    check_writable(opts.out_dir)
    labels_dir = opts.labels_dir or os.path.join(opts.out_dir, "labels")
    inputs = collect_inputs(opts.images, labels_dir)
    inputs = inputs[:opts.max_images] if opts.max_images else inputs
    with distributed(opts.device) as (rank, world_size, device):
        interpreter = Interpreter.load(opts.run_dir, opts.model_path, device)
        cfg = interpreter.cfg
        resolution = student_resolution(cfg, opts.resolution)
        validation_path = opts.validation_path or cfg.validation_path
        if validation_path and not os.path.isdir(validation_path):
            raise FileNotFoundError(f"validation images {validation_path!r}: no such folder")
        label_opts = PredictOptions(inputs=opts.images, out_dir=labels_dir, run_dir=opts.run_dir,
                                    model_path=opts.model_path, device=opts.device, batch_size=opts.label_batch_size,
                                    overlay=False)
        header_model = run_header(label_opts, interpreter)["model"]
        # Before labelling: another interpreter would relabel the student folder's labels/ before the refusal.
        check_options_settings(opts.out_dir, student_settings(opts, header_model, resolution, validation_path))
        # Both folders: with --labels_dir elsewhere, labelling does not create --out, whose lock comes next.
        os.makedirs(labels_dir, exist_ok=True)
        os.makedirs(opts.out_dir, exist_ok=True)
        start = time.time()
        with folder_lock(labels_dir, "distill") if rank == 0 else contextlib.nullcontext():
            labelled = segment_inputs(label_opts, inputs, interpreter, rank, world_size)
        label_seconds = time.time() - start
        del interpreter  # its backbone's memory goes to the student's training
        with folder_lock(opts.out_dir, "distill") if rank == 0 else contextlib.nullcontext():
            return _train(opts, cfg, labelled, header_model, labels_dir, resolution, validation_path, label_seconds,
                          rank, world_size, device)


def student_settings(opts, header_model, resolution, validation_path, kept=None) -> dict:
    """What the student depends on (settings.json): the interpreter, the options and, once labelled, the kept
    images (labels_sha256; None before labelling)."""
    return {"interpreter": header_model,
            "labels_sha256": None if kept is None else labelling_digest(header_model, kept),
            "student": opts.student, "resolution": resolution, "backbone_weights": opts.backbone_weights,
            "max_images": opts.max_images, "uncertainty_portion": opts.uncertainty_portion,
            "validation_path": os.path.abspath(validation_path) if validation_path else None,
            "learning_rate": opts.learning_rate, "batch_size": opts.batch_size, "seed": opts.seed}


def check_options_settings(out_dir, settings) -> None:
    """Refuse a student folder made with other settings, save for the labels, which are not known yet."""
    path = os.path.join(out_dir, SETTINGS_NAME)
    if os.path.isfile(path):
        saved = read_json_object(path, "settings")
        check_settings(path, {**settings, "labels_sha256": saved.get("labels_sha256")}, write=False)


def _train(opts, cfg, labelled, header_model, labels_dir, resolution, validation_path, label_seconds, rank,
           world_size, device):
    rows = labelled["rows"]
    if not rows:
        raise ValueError(f"--images {list(opts.images)}: none of the images could be labelled (see the lines above)")
    keep = filter_indices([row["score"] for row in rows], opts.uncertainty_portion)
    kept = [rows[i] for i in keep]
    pairs = [(row["image"], output_path(labels_dir, "masks", row["stem"], ".png")) for row in kept]
    size = tuple(cfg.dim[:2])
    val_items = (load_labelled_folder(validation_path, len(list_images(validation_path)), size, cfg.number_class,
                                      cfg.ignore_label, palette=class_table(cfg)[1])
                 if validation_path else [])
    check_settings(os.path.join(opts.out_dir, SETTINGS_NAME),
                   student_settings(opts, header_model, resolution, validation_path, kept), write=rank == 0)
    if rank == 0:
        print(f"{len(kept)} of {len(rows)} labelled images kept (the {opts.uncertainty_portion:g} most uncertain "
              f"left out); student {opts.student} at {resolution}x{resolution}, {len(val_items)} validation images; "
              f"student folder {opts.out_dir}")

    seed_everything(opts.seed)  # the same initial weights on every rank
    model = build_network(opts.student, cfg.number_class, opts.backbone_weights).to(device)
    segmenter = NetworkSegmenter(cfg, model, resolution, opts.student)
    best_path = os.path.join(opts.out_dir, BEST_NAME)

    def validate():
        if not val_items:
            return None
        model.eval()
        return evaluate_segmenter(segmenter, val_items).miou()

    start = time.time()
    state = fit(model, LabelledFilesDataset(pairs, resolution), opts, os.path.join(opts.out_dir, LAST_NAME),
                lambda: atomic_torch_save({"model_state_dict": cpu_state(model)}, best_path), validate,
                cfg.ignore_label, rank, world_size, device)
    train_seconds = time.time() - start
    if rank != 0:
        return {}

    model.load_state_dict(safe_load(best_path, "student checkpoint")["model_state_dict"])
    model.eval()
    save_student(opts.out_dir, model, opts.student, resolution, cfg)
    metrics = {"student": opts.student, "resolution": resolution, "best_epoch": state["best_epoch"],
               "val_miou": state["best_val_miou"] if val_items else None, "val_history": state["val_history"],
               "num_images": len(rows) + len(labelled["failed"]), "num_labelled": len(rows),
               "num_kept": len(kept), "uncertainty_portion": opts.uncertainty_portion,
               "labelling_s": label_seconds, "training_s": train_seconds, "interpreter_miou": interpreter_miou(opts.run_dir)}
    if os.path.isdir(cfg.testing_path):
        test_items = load_split(cfg, "test")
        metrics = {**iou_metrics(evaluate_segmenter(segmenter, test_items), segmenter.class_names, cfg.ignore_label),
                   **metrics, "num_test_images": len(test_items)}
        teacher = metrics["interpreter_miou"]
        print(f"student test mIoU {100 * metrics['miou']:.2f}"
              + (f" (the interpreter's: {100 * teacher:.2f})" if teacher is not None else "") + f"  ({opts.out_dir})")
    atomic_write_json(os.path.join(opts.out_dir, "metrics.json"), metrics)
    return metrics


def interpreter_miou(run_dir) -> Optional[float]:
    """The test mIoU train-interpreter recorded for the interpreter, when it did."""
    path = os.path.join(run_dir, "metrics.json")
    return read_json_object(path, "metrics").get("miou") if os.path.isfile(path) else None
