"""The store phase: time and peak memory of extraction-to-store. Ours puts native-resolution 16-bit maps into
a FeatureStore; the original upsamples every map to full resolution in float32 and builds one [N*H*W, D]
tensor, measured at --orig-n images and computed for --n."""

import os
import shutil
import tempfile
import time

import torch

from ..feature_store import FeatureStore
from ..progress import progress_bar
from .harness import GB, run_isolated, store_dtype
from .original import original_at_n, original_training_set
from .synthetic import synthetic_task


def build_store(task, indices, kind="ram", root=None, progress=True, dtype=torch.float16):
    """FeatureStore and teacher labels [N, H, W] of images `indices`, and the seconds spent
    putting maps into the store (making the synthetic maps and labels not counted)."""
    store = FeatureStore(task.map_shapes, task.image_size, len(indices), dtype=dtype,
                         root=root if kind == "disk" else None)
    labels = torch.empty(len(indices), *task.image_size, dtype=torch.long)
    make_s = 0.0
    start = time.perf_counter()
    for row, i in enumerate(progress_bar(indices, desc=f"ours: store ({kind})", disable=not progress)):
        t0 = time.perf_counter()
        maps = task.maps(i)
        labels[row] = task.labels(maps)
        make_s += time.perf_counter() - t0
        store.put(row, maps)
    return store, labels, time.perf_counter() - start - make_s


def scratch_store(opts, task, indices):
    """build_store per --store; a disk store lives in a temporary folder, removed right after."""
    if opts.store == "ram":
        return build_store(task, indices, progress=not opts.quiet, dtype=store_dtype(opts))
    root = tempfile.mkdtemp(prefix="ddpm-seg-bench-")
    try:
        return build_store(task, indices, "disk", root=os.path.join(root, "store"), progress=not opts.quiet,
                           dtype=store_dtype(opts))
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the open memmaps stay valid after their files are unlinked


def job_store_ours(opts):
    store, _, seconds = scratch_store(opts, synthetic_task(opts), range(opts.n))
    return {"n": opts.n, "time_s": seconds, "store_bytes": store.nbytes}


def job_store_original(opts):
    X, _, seconds = original_training_set(synthetic_task(opts), range(opts.orig_n), progress=not opts.quiet)
    return {"n": opts.orig_n, "time_s": seconds, "tensor_bytes": X.numel() * X.element_size()}


def measure(opts, say):
    """Both approaches, each in its own process; the original's time and peak computed for --n images."""
    ours, orig = run_isolated(job_store_ours, opts), original_at_n(run_isolated(job_store_original, opts), opts)
    orig["time_s_computed"] = orig["time_s"] / opts.orig_n * opts.n  # every step is linear in N
    say(f"store: ours {ours['time_s']:.2f} s for N={opts.n} ({ours['store_bytes'] / GB:.3f} GB = "
        f"{ours['store_bytes'] / 2**30:.3f} GiB {opts.store} store), peak RSS {ours['peak_rss'] / GB:.2f} GB | "
        f"original {orig['time_s']:.2f} s for N={opts.orig_n} ({orig['tensor_bytes'] / GB:.2f} GB tensor), "
        f"peak RSS {orig['peak_rss'] / GB:.2f} GB measured (formula {orig['peak_rss_formula_at_measured_n'] / GB:.2f}"
        f" GB, copy factor {orig['copy_factor_measured']:.2f}); computed for N={opts.n}: "
        f"{orig['time_s_computed']:.1f} s, peak RSS {orig['peak_rss_computed'] / GB:.1f} GB")
    return {"ours": ours, "original": orig}
