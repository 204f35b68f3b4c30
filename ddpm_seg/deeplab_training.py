"""Training DeepLabV3 on a synthetic labelled dataset (DatasetDDPM or DatasetGAN) and testing it on real images:
`ddpm-seg train-deeplab` runs it.

The synthetic .npz is read and filtered by uncertainty score (load_synthetic, filter_indices); train_deeplab
trains (or resumes from deeplab_last.pth) with DistributedDataParallel under torchrun, keeps the best
validation epoch in deeplab_best.pth and scores it on the test images into metrics.json. The run folder,
the checkpoints' format and the seeding of each epoch are described in the command's help.
"""

import os
import zipfile
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from guided_diffusion.checkpoint import safe_load

from .backbones import image_tensor
from .class_info import class_table
from .config import check_paths, experiment_suffix, run_dir
from .data import list_images, load_labelled_folder, resize_image, resize_label, synthetic_dataset_path
from .deeplab import EXPERIMENT_NAME, build_deeplab, cpu_state
from .device import distributed
from .evaluate import ConfusionMatrix, iou_metrics
from .files import atomic_torch_save, atomic_write_json, check_settings, check_writable
from .fingerprint import data_sha256, file_sha256
from .progress import progress_bar
from .seeding import derive_seed, seed_everything

SETTINGS_NAME = "settings.json"


@dataclass(frozen=True)
class DeepLabOptions:
    """How a DeepLab run trains and tests: train-deeplab's flags, typed, with their defaults."""
    seed: int = 0  # training seed; also picks the default data (the seed_<seed> ensemble's samples)
    data_path: str = ""  # the synthetic .npz ("": samples_<H>x<W>x3.npz in <exp_dir>/<steps_blocks>/seed_<seed>)
    out_dir: Optional[str] = None  # the run folder (None: deeplab_dir)
    max_data: int = 0  # use the first N samples (0: all)
    uncertainty_portion: float = 0.1  # share of the samples with the highest uncertainty score left out
    drop_most_certain: int = 0  # the K most certain samples left out in place of K of the most uncertain
    backbone: str = "resnet101"  # a ddpm_seg.deeplab.DEEPLABS name
    backbone_weights: str = ""  # torchvision ResNet state dict to start the backbone from ("": random init)
    learning_rate: float = 1e-3  # Adam learning rate
    batch_size: int = 8  # samples per step, per process
    num_epoch: int = 20  # training epochs
    eval_batch_size: int = 8  # images per forward when scoring validation and test images
    num_workers: int = 4  # DataLoader worker processes
    device: str = "auto"  # auto | cpu | cuda[:i] (under torchrun: cuda:LOCAL_RANK)


def load_synthetic(path: str):
    """(images uint8 [N, H, W, 3], labels [N, H, W], uncertainty scores [N]) from a DatasetDDPM (3 arrays)
    or DatasetGAN (4 arrays, latents third) .npz."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"synthetic dataset {path!r} does not exist; make it with ddpm-seg generate-dataset "
                                "or download one (synthetic-datasets/*/download_synthetic_dataset.sh)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz archive (truncated or another format): {e}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # np.load reads by content, whatever the file's name
        raise ValueError(f"{path}: holds a single array (np.save's .npy format); expected an .npz archive of "
                         "arr_0..arr_2 as generate-dataset writes")
    with npz:
        names = sorted(npz.files, key=lambda n: int(n.split("_")[1]) if n.startswith("arr_") else -1)
        if len(names) not in (3, 4) or not all(n.startswith("arr_") for n in names):
            raise ValueError(f"{path}: expected arrays arr_0..arr_2 (images, labels, uncertainties) or arr_0..arr_3 "
                             f"(images, labels, latents, uncertainties), found {npz.files}")
        try:
            images, labels, scores = npz[names[0]], npz[names[1]], npz[names[-1]]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{path}: an array in the archive is damaged (truncated file?): {e}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:3] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integer [N, H, W] = {images.shape[:3]}, got {labels.dtype} {labels.shape}")
    if scores.shape != (len(images),):
        raise ValueError(f"{path}: uncertainty scores must be [N] = ({len(images)},), got {scores.shape}")
    return images, labels, scores


def filter_indices(scores, uncertainty_portion: float = 0.1, drop_most_certain: int = 0) -> np.ndarray:
    """Indices (ascending) of the samples kept: sorted by uncertainty score, the int(N * portion) most
    uncertain are left out. drop_most_certain = K shifts that window by K, as the original code does
    with K = 30: the K most certain and int(N * portion) - K most uncertain go, and as many remain."""
    scores = np.asarray(scores)
    if not 0 <= uncertainty_portion < 1:
        raise ValueError(f"uncertainty_portion must lie in [0, 1), got {uncertainty_portion}")
    dropped = int(len(scores) * uncertainty_portion)
    if not 0 <= drop_most_certain <= dropped:
        raise ValueError(f"drop_most_certain must lie in 0..int(N * uncertainty_portion) = {dropped} "
                         f"(N = {len(scores)}), got {drop_most_certain}")
    order = np.argsort(scores, kind="stable")
    return np.sort(order[drop_most_certain : len(scores) - dropped + drop_most_certain])


class SyntheticSegmentationDataset(Dataset):
    """The selected samples resized to resolution x resolution (image bilinear, label nearest), image
    ImageNet-normalised [3, R, R] float, label [R, R] int64."""

    def __init__(self, images, labels, indices, resolution):
        self.images, self.labels, self.indices = images, labels, np.asarray(indices)
        self.size = (resolution, resolution)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        image = image_tensor(resize_image(self.images[j], self.size), "cpu", "imagenet")[0]
        return image, torch.from_numpy(resize_label(self.labels[j], self.size).astype(np.int64))


def check_labels(labels, indices, number_class, ignore_label, path, chunk=256):
    """Every label of the kept samples is a class id or ignore_label (cross-entropy would fail on others)."""
    present = set()
    for start in range(0, len(indices), chunk):
        values = labels[indices[start:start + chunk]]
        if values.size and values.min() < 0:
            raise ValueError(f"{path}: labels hold negative values")
        present |= set(np.flatnonzero(np.bincount(values.ravel())).tolist())
    bad = sorted(v for v in present if v >= number_class and v != ignore_label)
    if bad:
        raise ValueError(f"{path}: labels hold class ids {bad[:10]} outside 0..{number_class - 1} "
                         f"(ignore_label is {ignore_label})")


@torch.no_grad()
def evaluate_deeplab(model, items, number_class, ignore_label, batch_size=8) -> ConfusionMatrix:
    """Confusion matrix of the model's argmax over labelled items (already at the model's input size)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(number_class, ignore_label)
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        x = torch.cat([image_tensor(it.image, device, "imagenet") for it in batch])
        pred = model(x)["out"].argmax(1).cpu()
        matrix.update(pred, torch.from_numpy(np.stack([it.label for it in batch])))
    model.train(was_training)
    return matrix


def deeplab_dir(cfg, opts: DeepLabOptions) -> str:
    name = f"deeplab_class_{cfg.number_class}_checkpoint_{opts.max_data}_filter_out_{opts.uncertainty_portion:f}"
    if opts.drop_most_certain:
        name += f"_drop_certain_{opts.drop_most_certain}"
    if opts.backbone != "resnet101":
        name += f"_{opts.backbone}"
    return os.path.join(cfg.exp_dir, experiment_suffix(cfg), name, f"seed_{opts.seed}")


def epoch_seed(seed, epoch, rank):
    return derive_seed(seed, epoch, rank)


def check_options(cfg, exp_path, opts):
    if cfg.deeplab_res is None:
        raise ValueError(f"{exp_path}: train-deeplab needs 'deeplab_res' (the DeepLab input size, 256 in the paper)")
    if cfg.validation_path is None:
        raise ValueError(f"{exp_path}: train-deeplab needs 'validation_path' (real labelled images to pick the epoch)")
    # torchvision's ASPP pools each image to 1x1 before a batch norm, which needs more than one value to train.
    if opts.batch_size < 2:
        raise ValueError(f"--batch_size must be >= 2 (DeepLabV3's pooled batch norm), got {opts.batch_size}")
    if opts.num_epoch < 1 or opts.max_data < 0:
        raise ValueError(f"--num_epoch must be >= 1 and --max_data >= 0, got {opts.num_epoch}, {opts.max_data}")


def fit(model, dataset, opts, last_path, save_best, validate, ignore_label, rank, world_size, device) -> dict:
    """Train `model` (already on `device`, the same initial weights on every rank) on `dataset` of (image, label)
    pairs with Adam and cross-entropy for opts.num_epoch epochs (opts: seed, learning_rate, batch_size per
    process, num_epoch, num_workers), with DistributedDataParallel when world_size > 1. After every epoch rank
    0 scores the model with validate() (a mIoU; None: no validation set, so the last epoch is the best), calls
    save_best() when it is the best so far and writes the training state to last_path, from which a stopped
    run resumes. Each epoch's data order and dropout are functions of (seed, epoch, rank), so a resumed run
    trains as an uninterrupted one. Returns {epoch, best_val_miou, best_epoch, val_history}."""
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.learning_rate)
    state = {"epoch": -1, "best_val_miou": -1.0, "best_epoch": -1, "val_history": []}
    if os.path.isfile(last_path):
        ckpt = safe_load(last_path, "training checkpoint")
        model.load_state_dict(ckpt["model_state_dict"])
        optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        state = {k: ckpt[k] for k in state}
        if rank == 0:
            print(f"resuming after epoch {state['epoch']} from {last_path}")
    net = model
    if world_size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=opts.seed,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=opts.batch_size, sampler=sampler, drop_last=True,
                        num_workers=opts.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=opts.num_workers > 0)  # not restarted every epoch
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} training samples after filtering are fewer than one batch of "
                         f"{opts.batch_size} per process over {world_size} process(es)")
    for epoch in range(state["epoch"] + 1, opts.num_epoch):
        sampler.set_epoch(epoch)
        torch.manual_seed(epoch_seed(opts.seed, epoch, rank))  # dropout: the same on resume
        net.train()
        bar = progress_bar(loader, desc=f"epoch {epoch}", disable=rank != 0)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(net(x)["out"], y, ignore_index=ignore_label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)  # drawn at the bar's interval, not per step
        if rank == 0:
            val_miou = validate()
            state["epoch"] = epoch
            if val_miou is None or val_miou > state["best_val_miou"]:
                state.update(best_val_miou=-1.0 if val_miou is None else val_miou, best_epoch=epoch)
                save_best()
            if val_miou is not None:
                state["val_history"].append(val_miou)
            atomic_torch_save({"model_state_dict": cpu_state(model), "optimizer_state_dict": optimizer.state_dict(),
                               **state}, last_path)
            print(f"epoch {epoch}: " + ("no validation images" if val_miou is None else
                  f"validation mIoU {100 * val_miou:.2f} (best {100 * state['best_val_miou']:.2f}, "
                  f"epoch {state['best_epoch']})"))
        if world_size > 1:
            dist.barrier()
    return state


def train_deeplab(cfg, exp_path, opts: DeepLabOptions) -> dict:
    """Train (or resume) on the experiment cfg (loaded from exp_path), pick the best validation epoch, test it;
    returns the metrics written to metrics.json ({} on every process but rank 0)."""
    check_options(cfg, exp_path, opts)
    check_paths(cfg, ["validation_path", "testing_path"], exp_path)
    with distributed(opts.device) as (rank, world_size, device):
        return _run(cfg, opts, rank, world_size, device)


def _run(cfg, opts, rank, world_size, device):
    data_path = opts.data_path or synthetic_dataset_path(run_dir(cfg, opts.seed), cfg.dim[:2])
    folder = opts.out_dir or deeplab_dir(cfg, opts)
    res, num_classes, ignore = cfg.deeplab_res, cfg.number_class, cfg.ignore_label
    images, labels, scores = load_synthetic(data_path)
    if opts.max_data:
        images, labels, scores = images[:opts.max_data], labels[:opts.max_data], scores[:opts.max_data]
    keep = filter_indices(scores, opts.uncertainty_portion, opts.drop_most_certain)
    check_labels(labels, keep, num_classes, ignore, data_path)
    size = (res, res)
    palette = class_table(cfg)[1]  # for colour masks
    val_items = load_labelled_folder(cfg.validation_path, len(list_images(cfg.validation_path)), size,
                                     num_classes, ignore, palette=palette)
    test_items = load_labelled_folder(cfg.testing_path, cfg.testing_number, size, num_classes, ignore,
                                      palette=palette)

    # The synthetic dataset and the validation images by content: a run is never resumed on other data.
    settings = {"data_path": os.path.abspath(data_path), "data_sha256": file_sha256(data_path),
                "validation_sha256": data_sha256(val_items), "max_data": opts.max_data,
                "uncertainty_portion": opts.uncertainty_portion, "drop_most_certain": opts.drop_most_certain,
                "backbone": opts.backbone, "backbone_weights": opts.backbone_weights,
                "learning_rate": opts.learning_rate, "batch_size": opts.batch_size, "deeplab_res": res,
                "seed": opts.seed}
    check_writable(folder)
    check_settings(os.path.join(folder, SETTINGS_NAME), settings, write=rank == 0)
    if rank == 0:  # class names, palette and input size for `ddpm-seg predict --deeplab`
        atomic_write_json(os.path.join(folder, EXPERIMENT_NAME), cfg.to_dict())

    seed_everything(opts.seed)  # the same initial weights on every rank
    model = build_deeplab(opts.backbone, num_classes, opts.backbone_weights).to(device)
    best_path = os.path.join(folder, "deeplab_best.pth")
    dataset = SyntheticSegmentationDataset(images, labels, keep, res)
    if rank == 0:
        print(f"{len(keep)} of {len(scores)} synthetic samples kept; {len(val_items)} validation and "
              f"{len(test_items)} test images at {res}x{res}; run folder {folder}")
    state = fit(model, dataset, opts, os.path.join(folder, "deeplab_last.pth"),
                lambda: atomic_torch_save({"model_state_dict": cpu_state(model)}, best_path),
                lambda: evaluate_deeplab(model, val_items, num_classes, ignore, opts.eval_batch_size).miou(),
                ignore, rank, world_size, device)
    if rank != 0:
        return {}

    model.load_state_dict(safe_load(best_path, "DeepLab checkpoint")["model_state_dict"])
    matrix = evaluate_deeplab(model, test_items, num_classes, ignore, opts.eval_batch_size)
    metrics = {
        **iou_metrics(matrix, class_table(cfg)[0], ignore),
        "val_miou": state["best_val_miou"],
        "best_epoch": state["best_epoch"],
        "val_history": state["val_history"],
        "seed": opts.seed,
        "model_type": f"deeplabv3_{opts.backbone}",
        "category": cfg.category,
        "random_init": False,
        "data_path": data_path,
        "num_synthetic_samples": int(len(scores)),
        "num_train_samples": int(len(keep)),
        "num_val_images": len(val_items),
        "num_test_images": len(test_items),
    }
    atomic_write_json(os.path.join(folder, "metrics.json"), metrics)
    print(f"test mIoU {100 * metrics['miou']:.2f} at epoch {state['best_epoch']} (validation {100 * state['best_val_miou']:.2f})"
          f"  ({folder})")
    return metrics

