"""The original code's pixel classifier and recipe, the baseline every phase measures ours against: its
full-resolution float32 training set, its member-by-member training loop (batch 64, Adam lr 1e-3) and its
full-resolution prediction, and the peak memory its data preparation needs for N images."""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ..ensemble import PAPER_BATCH, PAPER_LR, hidden_sizes
from ..progress import progress_bar
from .harness import IGNORE_LABEL
from .synthetic import layout_summary


class OriginalClassifier(nn.Module):
    """The original `pixel_classifier` (an nn.Sequential named `layers`), so that
    MLPEnsemble.member_state_dict loads into it without renaming."""

    def __init__(self, dim, num_classes):
        super().__init__()
        h1, h2 = hidden_sizes(num_classes)
        self.layers = nn.Sequential(
            nn.Linear(dim, h1), nn.ReLU(), nn.BatchNorm1d(h1),
            nn.Linear(h1, h2), nn.ReLU(), nn.BatchNorm1d(h2),
            nn.Linear(h2, num_classes),
        )

    def forward(self, x):
        return self.layers(x)


def original_member(ensemble, m):
    """Member m of `ensemble` as an OriginalClassifier (same weights)."""
    net = OriginalClassifier(ensemble.dim, ensemble.num_classes)
    net.load_state_dict({k.removeprefix("module."): v for k, v in ensemble.member_state_dict(m).items()})
    return net


def upsample_concat(maps, image_size):
    """One image's features as the original's collect_features makes them: every map upsampled to full
    resolution (bilinear, float32) and concatenated, [D, H, W]."""
    return torch.cat([F.interpolate(m[None].float(), image_size, mode="bilinear", align_corners=False)[0] for m in maps])


def original_training_set(task, indices, progress=True):
    """The original prepare_data on images `indices`: X [P, D] float32, y [P] uint8, and the seconds
    spent on it beyond making the synthetic maps and labels (which stand in for the UNet).

    As the original: one preallocated [N, D, H, W] tensor, a permute + reshape to [N*H*W, D] (a full
    copy while the first still exists), then the labelled rows picked out (another copy).
    """
    height, width = task.image_size
    X = torch.zeros(len(indices), task.dim, height, width)
    y = torch.zeros(len(indices), height, width, dtype=torch.uint8)
    make_s = 0.0
    start = time.perf_counter()
    for row, i in enumerate(progress_bar(indices, desc="original: full-res features", disable=not progress)):
        t0 = time.perf_counter()
        maps = task.maps(i)
        labels = task.labels(maps)
        make_s += time.perf_counter() - t0
        X[row] = upsample_concat(maps, task.image_size)
        y[row] = labels
    X = X.permute(1, 0, 2, 3).reshape(task.dim, -1).permute(1, 0)
    y = y.flatten()
    keep = y != IGNORE_LABEL
    X, y = X[keep], y[keep]
    return X, y, time.perf_counter() - start - make_s


def train_original_member(net, X, y, steps, seed):
    """The original training loop for one member, cut at `steps` steps: shuffled DataLoader batches of
    64, Adam lr 1e-3, float32, with the per-step loss.item() of its stopping rule."""
    loader = DataLoader(TensorDataset(X, y), batch_size=PAPER_BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(net.parameters(), lr=PAPER_LR)
    criterion = nn.CrossEntropyLoss()
    net.train()
    done = 0
    while done < steps:
        for x_batch, y_batch in loader:
            optimizer.zero_grad()
            loss = criterion(net(x_batch), y_batch.long())
            loss.backward()
            optimizer.step()
            loss.item()
            done += 1
            if done == steps:
                break
    return net.eval()


@torch.no_grad()
def predict_original(nets, maps, image_size):
    """The original prediction of one image: every member on all [H*W, D] full-resolution features,
    argmax per member, then the most frequent vote (without the uncertainty map, as ours here)."""
    features = upsample_concat(maps, image_size)
    x = features.view(features.shape[0], -1).permute(1, 0)
    votes = torch.stack([net(x).argmax(1) for net in nets])
    return torch.mode(votes, 0).values.view(image_size)


def original_peak_formula(base, bytes_per_image, n):
    """Peak RSS of the original's data preparation for n images: the [N, D, H, W] tensor and its
    reshape copy coexist (2n images' worth), and while it is being filled one image's upsampled maps
    and their concatenation add two more (n + 2)."""
    return base + bytes_per_image * max(2 * n, n + 2)


def original_at_n(measured, opts):
    """A measurement of the original at --orig-n images, with its peak RSS computed for --n images, and the
    formula's figure and the measured copy factor at --orig-n (how well the formula fits)."""
    bytes_per_image = layout_summary(opts.small)["full_res_bytes_per_image"]
    measured["peak_rss_computed"] = original_peak_formula(measured["base_rss"], bytes_per_image, opts.n)
    measured["peak_rss_formula_at_measured_n"] = original_peak_formula(measured["base_rss"], bytes_per_image,
                                                                       opts.orig_n)
    measured["copy_factor_measured"] = (measured["peak_rss"] - measured["base_rss"]) / (opts.orig_n * bytes_per_image)
    return measured
