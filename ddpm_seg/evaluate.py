"""Turn an ensemble's logits into a label map, score its uncertainty, and measure mIoU.

Conventions follow the official ddpm-segmentation code (src/pixel_classifier.py,
predict_labels and compute_iou), so numbers are comparable with the paper.
"""

import numpy as np
import torch
import torch.nn.functional as F


def _check_ensemble_logits(logits: torch.Tensor) -> None:
    if not torch.is_tensor(logits) or logits.dim() != 4:
        shape = tuple(logits.shape) if hasattr(logits, "shape") else type(logits).__name__
        raise ValueError(f"expected ensemble logits as a tensor [members, classes, H, W], got {shape}")


def majority_vote(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel label [H, W] voted by the members of an ensemble, from logits [M, C, H, W].

    Each member votes with its argmax; the most frequent vote wins. Ties go the way
    torch.mode breaks them, as in the official code.
    """
    _check_ensemble_logits(logits)
    votes = logits.argmax(dim=1)  # [M, H, W]
    return torch.mode(votes, dim=0).values


def uncertainty_map(logits: torch.Tensor) -> torch.Tensor:
    """Mutual information between prediction and member, per pixel [H, W] (nats).

    Entropy of the members' mean softmax minus the mean of the members' own
    entropies: zero when all members agree exactly, larger the more they disagree
    (the official code's "js" map).
    """
    _check_ensemble_logits(logits)
    # Half-precision logits would make the entropy difference mostly rounding noise.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = F.softmax(logits, dim=1)
    # entr(p) = -p ln p with entr(0) = 0, so saturated softmaxes stay finite.
    member_entropy = torch.special.entr(probs).sum(dim=1)  # [M, H, W]
    ensemble_entropy = torch.special.entr(probs.mean(dim=0)).sum(dim=0)  # [H, W]
    return ensemble_entropy - member_entropy.mean(dim=0)


def image_uncertainty_score(unc_map: torch.Tensor, top_fraction: float = 0.1) -> float:
    """One number per image: the mean of its most uncertain top_fraction of pixels.

    With the default 0.1 this picks int(N / 10) pixels of N, as the official code does;
    at least one pixel is always used.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    values = torch.as_tensor(unc_map).flatten()
    if values.numel() == 0:
        raise ValueError("uncertainty map is empty")
    count = max(1, int(values.numel() * top_fraction))
    return torch.topk(values, count).values.mean().item()


def _as_long_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise ValueError(f"{what} must be a tensor or numpy array, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex():
        raise ValueError(f"{what} must hold integer class ids, got dtype {x.dtype}")
    return x.long()


def _ids_outside(ids: torch.Tensor, num_classes: int) -> list:
    """Up to ten distinct values of ids outside 0..num_classes-1 (empty when all are valid)."""
    outside = ids[(ids < 0) | (ids >= num_classes)]
    return outside.unique()[:10].tolist()


class ConfusionMatrix:
    """Pixel counts (ground truth, prediction) accumulated over a whole test set, and IoUs from them.

    Matches the official compute_iou:
      * Intersection and union of each class are summed over all images first, and the
        IoU of the class is taken once from those sums (not averaged per image).
      * mIoU averages over every class id 0..num_classes-1 except ignore_label. A class
        absent from both ground truth and predictions of the whole test set (union 0)
        counts as IoU 0 in that mean; it is not skipped. (The official code divides by
        union + 1e-8; we divide exactly, which differs by under 1e-8 relative.)
      * Pixels whose ground truth is ignore_label never count towards any class's ground
        truth, and the ignore_label class itself is never scored. But the official code
        still counts a prediction of class c on such a pixel in c's union (a false
        positive). drop_ignored_pixels=True instead drops those pixels entirely (the
        convention of most other segmentation benchmarks).

    ignore_label may be a valid class id (bedroom_28 uses 0, its background) or lie
    outside 0..num_classes-1 (255 elsewhere).
    """

    def __init__(self, num_classes: int, ignore_label: int, drop_ignored_pixels: bool = False):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.drop_ignored_pixels = drop_ignored_pixels
        # Rows: ground-truth class, plus a last row for pixels whose ground truth is
        # ignore_label. Columns: predicted class.
        self.counts = np.zeros((self.num_classes + 1, self.num_classes), dtype=np.int64)

    def update(self, pred, target) -> None:
        """Add one prediction / ground-truth pair (any equal shapes, e.g. [H, W] or [B, H, W])."""
        pred = _as_long_tensor(pred, "prediction")
        target = _as_long_tensor(target, "ground truth").to(pred.device)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != ground truth shape {tuple(target.shape)}")
        k = self.num_classes
        bad = _ids_outside(pred, k)
        if bad:
            raise ValueError(f"prediction holds class ids {bad} outside 0..{k - 1}")
        ignored = target == self.ignore_label
        bad = _ids_outside(target[~ignored], k)
        if bad:
            raise ValueError(
                f"ground truth holds labels {bad} that are neither a class id in 0..{k - 1} "
                f"nor the ignore label {self.ignore_label}"
            )
        row = torch.where(ignored, torch.full_like(target, k), target)
        flat = torch.bincount((row * k + pred).flatten(), minlength=(k + 1) * k)
        self.counts += flat.cpu().numpy().reshape(k + 1, k)

    def _intersection_union(self):
        scored = self.counts[: self.num_classes]
        intersection = np.diag(scored)
        predicted = scored.sum(axis=0)
        if not self.drop_ignored_pixels:
            predicted = predicted + self.counts[self.num_classes]
        union = scored.sum(axis=1) + predicted - intersection
        return intersection, union

    def _scored_ids(self) -> np.ndarray:
        ids = np.arange(self.num_classes)
        return ids[ids != self.ignore_label]

    def iou(self) -> np.ndarray:
        """Per-class IoU [num_classes] as float64; NaN for ignore_label and for classes with union 0."""
        intersection, union = self._intersection_union()
        ious = np.full(self.num_classes, np.nan)
        present = union > 0
        ious[present] = intersection[present] / union[present]
        if 0 <= self.ignore_label < self.num_classes:
            ious[self.ignore_label] = np.nan
        return ious

    def miou(self) -> float:
        """Mean IoU over all class ids except ignore_label, absent classes counting 0 (as the official code)."""
        ids = self._scored_ids()
        if ids.size == 0:
            raise ValueError("no class left to score: the only class is the ignore label")
        return float(np.nan_to_num(self.iou()[ids], nan=0.0).mean())


def format_iou_table(ious, class_names, miou: float, ignore_label=None) -> str:
    """Aligned text table (id, name, IoU %) with a closing mIoU line.

    NaN entries print as "absent" (the class never occurred in ground truth or
    prediction; it counts 0 towards mIoU), or "ignored" for ignore_label.
    """
    ious = np.asarray(ious, dtype=np.float64)
    if len(class_names) != len(ious):
        raise ValueError(f"got {len(ious)} IoUs but {len(class_names)} class names")
    name_width = max([len("class")] + [len(name) for name in class_names])
    id_width = max(2, len(str(len(ious) - 1)))
    lines = [f"{'id':>{id_width}}  {'class':<{name_width}}  {'IoU %':>7}"]
    for class_id, (name, value) in enumerate(zip(class_names, ious)):
        if class_id == ignore_label:
            cell = "ignored"
        elif np.isnan(value):
            cell = "absent"
        else:
            cell = f"{100 * value:.2f}"
        lines.append(f"{class_id:>{id_width}}  {name:<{name_width}}  {cell:>7}")
    lines.append(f"{'':>{id_width}}  {'mIoU':<{name_width}}  {100 * miou:>7.2f}")
    return "\n".join(lines)


def iou_metrics(matrix: ConfusionMatrix, class_names, ignore_label) -> dict:
    """Print the per-class IoU table with the dataset's class names; return {"miou", "iou": {name: IoU}}."""
    ious, miou = matrix.iou(), matrix.miou()
    print(format_iou_table(ious, class_names, miou, ignore_label=ignore_label))
    return {"miou": miou, "iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, ious)}}
