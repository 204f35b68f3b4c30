"""The train phase: ensemble training throughput (pixel presentations per second over all members) and peak
memory. Ours trains all members at once (train_ensemble, --batch pixels per member, bf16 matmuls where the
CPU has them) over the store of --n images; the original trains nn.Sequential members one after another from
a shuffled DataLoader over its full-resolution tensor, batch 64, float32. Also the original's training speed
at the e2e phase's feature width, which that phase's computed figures use."""

import time

import torch

from ..ensemble import PAPER_BATCH, MLPEnsemble, member_seed, train_ensemble
from ..feature_store import PixelSampler
from ..progress import progress_bar
from ..projection import projected_trainee
from .extraction import e2e_features, e2e_layout
from .harness import GB, IGNORE_LABEL, WARMUP_STEPS, bf16_matmuls, run_isolated
from .original import original_at_n, original_member, original_training_set, train_original_member
from .store import scratch_store
from .synthetic import synthetic_task

ORIGINAL_TRAIN_ROWS = 16384  # rows of the random [P, D] tensor the original's training step is timed on


def fit_ensemble(ensemble, store, labels, steps, opts):
    """train_ensemble for exactly `steps` steps per member of --batch pixels; returns the seconds it took."""
    start = time.perf_counter()
    train_ensemble(ensemble, store, PixelSampler(labels, ignore_label=IGNORE_LABEL), seed=opts.seed,
                   batch_size=opts.batch, steps=steps, matmul_dtype=torch.bfloat16 if bf16_matmuls(opts) else None,
                   progress=False)
    return time.perf_counter() - start


def job_train_ours(opts):
    task = synthetic_task(opts)
    store, labels, _ = scratch_store(opts, task, range(opts.n))
    ensemble = MLPEnsemble(task.dim, opts.classes, opts.members, seed=opts.seed)
    if opts.projection_width:  # the fast recipe's members see the projected features (its fit is not timed here)
        _, store, ensemble, _ = projected_trainee(ensemble, store, opts.projection_width, opts.seed)
    fit_ensemble(ensemble, store, labels, WARMUP_STEPS, opts)
    seconds = fit_ensemble(ensemble, store, labels, opts.train_steps, opts)
    # Each call starts every member's stream with a shuffle of all N images' labelled pixels, which a real
    # run does once per epoch (every ~3200 steps at N=50, batch 1024): timed alone and taken out.
    sampler = PixelSampler(labels, ignore_label=IGNORE_LABEL)
    start = time.perf_counter()
    for m in range(opts.members):
        next(sampler.stream(member_seed(opts.seed, m), opts.batch))
    setup = time.perf_counter() - start
    pixels = opts.members * opts.batch * opts.train_steps
    return {"n": opts.n, "time_s": seconds - setup, "stream_setup_s": setup, "pixels_per_s": pixels / (seconds - setup)}


def job_train_original(opts):
    task = synthetic_task(opts)
    X, y, _ = original_training_set(task, range(opts.orig_n), progress=not opts.quiet)
    init = MLPEnsemble(task.dim, opts.classes, opts.members, seed=opts.seed)
    train_original_member(original_member(init, 0), X, y, WARMUP_STEPS, opts.seed)
    start = time.perf_counter()
    for m in progress_bar(range(opts.members), desc="original: members one by one", disable=opts.quiet):
        train_original_member(original_member(init, m), X, y, opts.train_steps, member_seed(opts.seed, m))
    seconds = time.perf_counter() - start
    pixels = opts.members * PAPER_BATCH * opts.train_steps
    return {"n": opts.orig_n, "time_s": seconds, "pixels_per_s": pixels / seconds}


def job_e2e_original_train(opts):
    """The original's training speed on the e2e layout: pixels per second of train_original_member (batch 64,
    float32) on a random [ORIGINAL_TRAIN_ROWS, D] tensor (a step's cost does not depend on the data's size)."""
    layout = e2e_layout(opts)
    dim = e2e_features(opts)
    gen = torch.Generator().manual_seed(opts.seed)
    X = torch.randn(ORIGINAL_TRAIN_ROWS, dim, generator=gen)
    y = torch.randint(layout["classes"], (ORIGINAL_TRAIN_ROWS,), generator=gen, dtype=torch.uint8)
    init = MLPEnsemble(dim, layout["classes"], 1, seed=opts.seed)
    train_original_member(original_member(init, 0), X, y, WARMUP_STEPS, opts.seed)
    start = time.perf_counter()
    train_original_member(original_member(init, 0), X, y, opts.train_steps, opts.seed)
    seconds = time.perf_counter() - start
    return {"pixels_per_s": PAPER_BATCH * opts.train_steps / seconds, "features": dim}


def measure(opts, say):
    """Both approaches, each in its own process; the original's peak computed for --n images."""
    ours, orig = run_isolated(job_train_ours, opts), original_at_n(run_isolated(job_train_original, opts), opts)
    speedup = ours["pixels_per_s"] / orig["pixels_per_s"]
    say(f"train ({opts.members} members x {opts.train_steps} steps; ours batch {opts.batch}, "
        f"{f'{opts.projection_width} directions per resolution, ' if opts.projection_width else ''}"
        f"{'bf16 matmuls' if bf16_matmuls(opts) else 'fp32'}; original batch {PAPER_BATCH}, fp32): ours "
        f"{ours['pixels_per_s']:.0f} px/s ({ours['time_s']:.2f} s), peak RSS {ours['peak_rss'] / GB:.2f} GB at "
        f"N={opts.n} | original {orig['pixels_per_s']:.0f} px/s ({orig['time_s']:.2f} s), peak RSS "
        f"{orig['peak_rss'] / GB:.2f} GB at N={opts.orig_n}, computed {orig['peak_rss_computed'] / GB:.1f} GB at "
        f"N={opts.n} | speed ratio {speedup:.2f}x")
    return {"ours": ours, "original": orig, "speedup": speedup}
