"""Per-image activation maps kept at native resolution, and the pixel streams that train on them.

The original pipeline upsampled every activation map to full image resolution in float32 before
training (about 2.2 GB per 256x256 image for the DDPM features). Here maps stay at their own
resolution (float16 or bfloat16) and only the pixels a training step needs are interpolated, with
the arithmetic of `F.interpolate(mode="bilinear", align_corners=False)`.

Storage is channels-last and grouped by resolution: all maps of one size share a table
[N, h, w, C_total], so a pixel's 4 bilinear neighbours are 4 contiguous rows and one
`F.embedding_bag` (a fused, weighted row gather) interpolates every map of that size at once.
"""

import copy
import errno
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from .files import (WRITE_ERRNOS, WriteError, atomic_write_json, check_writable, format_bytes, free_bytes,
                    read_json_object, write_error)

META_FILE = "meta.json"
LAYOUT = "NHWC-by-resolution"
# torch dtype -> (name in meta.json, numpy dtype of the memmap, file suffix). numpy has no bfloat16:
# its memmap holds the raw 16-bit words, viewed as bfloat16 by torch.
_DTYPES = {
    torch.float16: ("float16", np.float16, "f16"),
    torch.bfloat16: ("bfloat16", np.uint16, "bf16"),
    torch.float32: ("float32", np.float32, "f32"),
}
_DTYPE_BY_NAME = {name: dtype for dtype, (name, _, _) in _DTYPES.items()}


def _source_index(in_size, out_size, dst):
    """Neighbour indices and weight of output coordinates `dst` under bilinear resizing in_size -> out_size.

    Same arithmetic as PyTorch for align_corners=False (float32 scale in/out, source coordinate
    clamped at 0, upper neighbour clamped to in_size - 1), so results match F.interpolate.
    """
    src = ((dst.to(torch.float32) + 0.5) * (in_size / out_size) - 0.5).clamp_(min=0)
    lo = src.long()  # src >= 0, so truncation is floor
    hi = (lo + 1).clamp_(max=in_size - 1)
    return lo, hi, src - lo


def bilinear_taps(h, w, img, ys, xs, out_size):
    """The 4 source rows [P, 4] (into a [N * h * w, C] table) and their weights [P, 4] that bilinear
    upsampling of h x w maps to out_size blends at pixels (img, ys, xs)."""
    y0, y1, wy = _source_index(h, out_size[0], ys)
    x0, x1, wx = _source_index(w, out_size[1], xs)
    row0 = (img * h + y0) * w
    row1 = (img * h + y1) * w
    rows = torch.stack([row0 + x0, row0 + x1, row1 + x0, row1 + x1], dim=1)
    weights = torch.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], dim=1)
    return rows, weights


class FeatureStore:
    """Activation maps of `num_images` images, at native resolution, in RAM or memory-mapped under `root`.

    map_shapes: [(C, h, w), ...] in feature order; the features of a pixel are the maps' channels
    bilinearly upsampled to `image_size` (H, W) and concatenated in this order.
    Maps of equal (h, w) live side by side in one table per resolution (in order of first
    appearance); `blocks[t]` lists table t's maps as (first feature, first table column, channels).
    With `root`, table t lives in `<root>/table{t}.<f16|bf16|f32>` ([N, h, w, C] raw array) and
    `<root>/meta.json` records shapes and which images are complete, so extraction can resume:
    constructing a store over an existing root with the same description reopens it.
    """

    def __init__(self, map_shapes, image_size, num_images, dtype=torch.float16, root=None):
        if dtype not in _DTYPES:
            raise ValueError(f"FeatureStore dtype must be one of {sorted(n for n, _, _ in _DTYPES.values())}, got {dtype}")
        self.map_shapes = [tuple(int(v) for v in shape) for shape in map_shapes]
        if not self.map_shapes or any(len(s) != 3 or min(s) < 1 for s in self.map_shapes):
            raise ValueError(f"map_shapes must be a non-empty list of positive (C, h, w), got {map_shapes}")
        self.image_size = tuple(int(v) for v in image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be positive (H, W), got {image_size}")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.num_images = int(num_images)
        self.dtype = dtype
        self.root = root
        self.table_sizes, self.blocks, self._slots = [], [], []
        feature = 0
        for c, h, w in self.map_shapes:
            if (h, w) not in self.table_sizes:
                self.table_sizes.append((h, w))
                self.blocks.append([])
            t = self.table_sizes.index((h, w))
            column = sum(n for _, _, n in self.blocks[t])
            self.blocks[t].append((feature, column, c))
            self._slots.append((t, column))
            feature += c
        self._complete = np.zeros(self.num_images, dtype=bool)
        self._memmaps = []
        if root is None:
            self._tables = [torch.zeros(self.num_images, h, w, c, dtype=dtype) for c, h, w in self._table_shapes()]
        else:
            self._tables = self._attach(root)

    def _table_shapes(self):
        return [(sum(n for _, _, n in blocks), h, w) for blocks, (h, w) in zip(self.blocks, self.table_sizes)]
    @classmethod
    def open(cls, root):
        """Reopen a memory-mapped store written earlier under `root`."""
        meta = cls._read_meta(root)
        return cls(meta["map_shapes"], meta["image_size"], meta["num_images"], _DTYPE_BY_NAME[meta["dtype"]], root)

    @staticmethod
    def _read_meta(root):
        path = os.path.join(root, META_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no feature store at {root}: {path} is missing")
        meta = read_json_object(path, "feature-store metadata")
        expected = {"layout", "dtype", "map_shapes", "image_size", "num_images", "complete"}
        if set(meta) != expected:
            raise ValueError(f"{path}: expected keys {sorted(expected)}")
        if meta["layout"] != LAYOUT or meta["dtype"] not in _DTYPE_BY_NAME:
            raise ValueError(f"{path}: unsupported layout {meta['layout']!r} or dtype {meta['dtype']!r}")
        return meta

    def _meta(self):
        return {
            "layout": LAYOUT,
            "dtype": _DTYPES[self.dtype][0],
            "map_shapes": [list(s) for s in self.map_shapes],
            "image_size": list(self.image_size),
            "num_images": self.num_images,
            "complete": [int(i) for i in np.flatnonzero(self._complete)],
        }

    def _attach(self, root):
        """Create the table files under root, or reopen them if root already holds this same store."""
        meta_path = os.path.join(root, META_FILE)
        exists = os.path.isfile(meta_path)
        if exists:
            found = self._read_meta(root)
            wanted = self._meta()
            for key in ("dtype", "map_shapes", "image_size", "num_images"):
                if found[key] != wanted[key]:
                    raise ValueError(f"{meta_path}: {key} is {found[key]}, but this store wants {wanted[key]}")
            self._complete[found["complete"]] = True
        _, np_dtype, suffix = _DTYPES[self.dtype]
        paths = [os.path.join(root, f"table{t}.{suffix}") for t in range(len(self.table_sizes))]
        shapes = [(self.num_images, h, w, c) for c, h, w in self._table_shapes()]
        if exists:
            for path, shape in zip(paths, shapes):
                size = os.path.getsize(path) if os.path.isfile(path) else None
                if size != int(np.prod(shape)) * np.dtype(np_dtype).itemsize:
                    raise ValueError(f"{path}: expected a {_DTYPES[self.dtype][0]} array of shape {shape}, found size {size}")
        else:
            check_writable(root)
        self._reserve(paths, [int(np.prod(shape)) * np.dtype(np_dtype).itemsize for shape in shapes])
        tables = []
        for path, shape in zip(paths, shapes):
            mm = np.memmap(path, dtype=np_dtype, mode="r+", shape=shape)
            self._memmaps.append(mm)
            tables.append(torch.from_numpy(mm).view(self.dtype))
        if not exists:
            atomic_write_json(meta_path, self._meta())
        return tables

    @staticmethod
    def _reserve(paths, sizes):
        """Allocate the table files' blocks on disk before they are memory-mapped.

        Writing through a memory map to a disk that has run out of space does not fail with an error: the
        process is killed by SIGBUS ("Bus error"). So the free space is checked against the store's size,
        which is known in advance, and the blocks are then allocated (posix_fallocate), so that nothing
        written later through the map can meet a full disk. A store that does not fit leaves no file."""
        root = os.path.dirname(paths[0])
        allocated = sum(os.stat(p).st_blocks * 512 for p in paths if os.path.exists(p))
        needed, free = sum(sizes) - allocated, free_bytes(root)
        if free is not None and needed > free:
            raise WriteError(f"cannot write the feature store in {root}: it needs {format_bytes(needed)} more and "
                             f"the disk has {format_bytes(free)} free; free some space, or use --store ram if the "
                             "features fit in memory")
        created = []
        os.makedirs(root, exist_ok=True)
        try:
            for path, size in zip(paths, sizes):
                new = not os.path.exists(path)
                if new:
                    created.append(path)
                with open(path, "w+b" if new else "r+b") as f:
                    try:
                        os.posix_fallocate(f.fileno(), 0, size)
                    except OSError as e:
                        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                            raise
                        f.truncate(size)  # a file system without fallocate: the check above is all we can do
        except OSError as e:
            for created_path in created:
                os.remove(created_path)
            if not os.listdir(root):
                os.rmdir(root)
            if e.errno in WRITE_ERRNOS:
                raise write_error(e, path) from None
            raise

    @property
    def num_features(self):
        return sum(c for c, _, _ in self.map_shapes)

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self._tables)

    @property
    def device(self):
        return self._tables[0].device

    def missing(self):
        """Indices of images not yet `put` (what an interrupted extraction still has to do)."""
        return [int(i) for i in np.flatnonzero(~self._complete)]

    def put(self, i, maps):
        """Store image i's maps, given as [C, h, w] tensors (any float dtype or device) in map order."""
        if not 0 <= i < self.num_images:
            raise ValueError(f"image index {i} out of range [0, {self.num_images})")
        if len(maps) != len(self.map_shapes):
            raise ValueError(f"expected {len(self.map_shapes)} maps, got {len(maps)}")
        for k, (fmap, shape) in enumerate(zip(maps, self.map_shapes)):
            if tuple(fmap.shape) != shape:
                raise ValueError(f"map {k} has shape {tuple(fmap.shape)}, expected {shape}")
        for (t, column), fmap in zip(self._slots, maps):
            self._tables[t][i, :, :, column:column + fmap.shape[0]].copy_(fmap.detach().permute(1, 2, 0))
        # Data reaches disk before the image is marked complete, so a crash never leaves a
        # half-written image that resume would skip.
        for mm in self._memmaps:
            mm.flush()
        self._complete[i] = True
        if self.root is not None:
            atomic_write_json(os.path.join(self.root, META_FILE), self._meta())

    def maps(self, i):
        """Image i's maps as [C, h, w] views into the store (store dtype; do not modify)."""
        return [self._tables[t][i, :, :, column:column + c].permute(2, 0, 1)
                for (t, column), (c, _, _) in zip(self._slots, self.map_shapes)]

    def to(self, device):
        """An in-memory copy of this store on `device` (e.g. the GPU, where gathers are fastest)."""
        other = copy.copy(self)
        other.root = None
        other._memmaps = []
        other._complete = self._complete.copy()
        other._tables = [t.to(device, copy=True) for t in self._tables]
        return other

    def gather_tables(self, img, ys, xs):
        """Per table t, the features [P, C_t] (store dtype) of pixels (img, ys, xs): its maps bilinearly
        upsampled to image_size (align_corners=False) and sampled there, side by side as in `blocks[t]`.

        One fused weighted row gather per resolution (F.embedding_bag accumulates in float32): no
        [4, P, C] neighbour copies, the cost is reading the 4 rows. Reading them is the bound, so
        pixels sorted by position (as train_ensemble does) run faster: consecutive rows are nearby.
        """
        if not img.shape == ys.shape == xs.shape or img.dim() != 1:
            raise ValueError(f"img, ys, xs must be 1-D of equal length, got {img.shape}, {ys.shape}, {xs.shape}")
        img, ys, xs = (v.to(self.device) for v in (img, ys, xs))
        parts = []
        for table, (h, w) in zip(self._tables, self.table_sizes):
            rows, weights = bilinear_taps(h, w, img, ys, xs, self.image_size)
            parts.append(F.embedding_bag(rows, table.view(-1, table.shape[-1]), mode="sum",
                                         per_sample_weights=weights.to(self.dtype)))
        return parts

    def gather(self, img, ys, xs, out_dtype=torch.float32):
        """Features [P, num_features] of pixels (img, ys, xs) in feature order (map order): every map
        bilinearly upsampled to image_size (align_corners=False), sampled there and concatenated."""
        parts = self.gather_tables(img, ys, xs)
        out = torch.empty(img.numel(), self.num_features, dtype=out_dtype, device=self.device)
        for part, blocks in zip(parts, self.blocks):
            for feature, column, c in blocks:
                out[:, feature:feature + c] = part[:, column:column + c]
        return out


class PixelSampler:
    """The labelled (non-ignored) pixels of N label maps, served as shuffled per-member batches.

    Pixels are identified by flat indices into labels.view(-1); `lookup` turns them into
    (image, y, x, label).
    """

    def __init__(self, labels, ignore_label=255):
        if labels.dim() != 3:
            raise ValueError(f"labels must be [N, H, W], got shape {tuple(labels.shape)}")
        self.image_size = tuple(labels.shape[1:])
        self.labels = labels.reshape(-1).to("cpu", torch.long)
        # int32 halves the per-member epoch orders (10 x 3.3M pixels at N=50: 131 MB saved); flat pixel
        # indices stay far below 2**31 (that would be 32k images of 256x256).
        self.valid = torch.nonzero(self.labels != ignore_label).squeeze(1).to(torch.int32)
        if self.valid.numel() < 2:
            raise ValueError(f"need at least 2 labelled pixels (label != {ignore_label}), found {self.valid.numel()}")

    def __len__(self):
        return self.valid.numel()

    def stream(self, seed, batch_size, fraction=1.0):
        """Endless (epoch, flat pixel indices) batches: each epoch is a fresh shuffle of all
        labelled pixels, every one exactly once, of which the first ceil(fraction x count) are served
        (fraction 1: all, the original epoch). A final batch of a single pixel joins the one
        before it, because batch norm cannot train on one sample."""
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch norm needs 2 samples), got {batch_size}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction of pixels per epoch must lie in (0, 1], got {fraction}")
        count = self.epoch_size(fraction)
        gen = torch.Generator().manual_seed(seed)
        epoch = 0
        while True:
            order = self.valid[torch.randperm(self.valid.numel(), generator=gen)[:count]]
            batches = list(order.split(batch_size))
            if len(batches) > 1 and batches[-1].numel() == 1:
                batches[-2:] = [torch.cat(batches[-2:])]
            for batch in batches:
                yield epoch, batch
            epoch += 1

    def epoch_size(self, fraction=1.0):
        """Pixels one epoch of stream(..., fraction) serves."""
        return min(self.valid.numel(), max(2, math.ceil(fraction * self.valid.numel())))

    def steps_per_epoch(self, batch_size, fraction=1.0):
        """Batches one epoch of stream(seed, batch_size, fraction) yields."""
        count = self.epoch_size(fraction)
        return count // batch_size + (count % batch_size > 1)

    def lookup(self, idx):
        """(img, ys, xs, label) LongTensors for flat pixel indices idx."""
        h, w = self.image_size
        idx = idx.long()
        img, rest = idx.div(h * w, rounding_mode="floor"), idx.remainder(h * w)
        return img, rest.div(w, rounding_mode="floor"), rest.remainder(w), self.labels[idx]
