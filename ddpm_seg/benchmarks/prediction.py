"""The predict phase: time and peak memory of segmenting one held-out image with every member and a majority
vote. Ours runs predict_logits (first Linear at native resolution); the original runs every member on the
[H*W, D] full-resolution features. Both use the same trained members, so their labels must agree."""

import torch

from ..ensemble import MLPEnsemble, predict_logits
from ..evaluate import majority_vote
from .harness import GB, run_isolated, store_dtype, timed_runs
from .original import original_member, predict_original
from .store import build_store
from .synthetic import HELD_OUT, make_layout, synthetic_task
from .training import fit_ensemble

PREDICT_FIT_STEPS = 30  # the members are trained a little so their votes mean something


def job_predict_ours(opts):
    """Train a small ensemble briefly (untimed), then time predict_logits + majority_vote on a held-out
    image. Returns the ensemble's weights too (as numpy), for the original to predict with the same members."""
    task = synthetic_task(opts)
    store, labels, _ = build_store(task, range(1), progress=False, dtype=store_dtype(opts))
    ensemble = MLPEnsemble(task.dim, opts.classes, opts.members, seed=opts.seed)
    fit_ensemble(ensemble, store, labels, PREDICT_FIT_STEPS, opts)
    maps = task.maps(HELD_OUT)
    result = timed_runs(opts.predict_runs, lambda: majority_vote(predict_logits(ensemble, maps, task.image_size)))
    result["weights"] = {k: v.numpy() for k, v in ensemble.state_dict().items()}
    return result


def job_predict_original(opts, weights):
    task = synthetic_task(opts)
    ensemble = MLPEnsemble(task.dim, opts.classes, opts.members)
    ensemble.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    nets = [original_member(ensemble, m).eval() for m in range(opts.members)]
    maps = task.maps(HELD_OUT)
    return timed_runs(opts.predict_runs, lambda: predict_original(nets, maps, task.image_size))


def measure(opts, say):
    """Both approaches, each in its own process, and the share of pixels where their labels agree."""
    ours = run_isolated(job_predict_ours, opts)
    orig = run_isolated(job_predict_original, opts, ours.pop("weights"))
    agreement = float((ours.pop("pred") == orig.pop("pred")).mean())
    speedup = orig["time_s"] / ours["time_s"]
    height, width = make_layout(opts.small)[1]
    say(f"predict (one {height}x{width} image, {opts.members} members, median of "
        f"{opts.predict_runs}): ours {ours['time_s']:.3f} s, peak RSS {ours['peak_rss'] / GB:.2f} GB | original "
        f"{orig['time_s']:.3f} s, peak RSS {orig['peak_rss'] / GB:.2f} GB | {speedup:.2f}x faster, "
        f"same label on {100 * agreement:.3f}% of pixels")
    return {"ours": ours, "original": orig, "speedup": speedup, "agreement": agreement}
