"""The quality phase: mIoU of ours and of the original on held-out images of the synthetic task, learnt from
the same initial members with each member seeing the same number of pixels (--quality-epochs passes over the
training pixels), each approach at its own batch size. This is what makes the train phase's speed ratio a
ratio at equal mIoU: both approaches get equally far through the data, ours in less time."""

import math

import torch

from ..ensemble import PAPER_BATCH, MLPEnsemble, member_seed, predict_logits
from ..evaluate import ConfusionMatrix, majority_vote
from ..progress import progress_bar
from ..projection import projected_trainee
from .harness import IGNORE_LABEL, run_isolated, store_dtype
from .original import original_member, original_training_set, predict_original, train_original_member
from .store import build_store
from .synthetic import HELD_OUT, synthetic_task
from .training import fit_ensemble


def job_quality(opts):
    """Both approaches from the same initial members, each member trained on quality_epochs x the labelled
    pixels of quality_n images (ours in batches of --batch, the original in batches of 64); mIoU of each
    ensemble's majority vote on quality_test held-out images, and of random guessing."""
    task = synthetic_task(opts)
    train_images = range(opts.quality_n)
    ensemble = MLPEnsemble(task.dim, opts.classes, opts.members, seed=opts.seed)
    nets = [original_member(ensemble, m) for m in range(opts.members)]  # copies of the initial weights

    store, labels, _ = build_store(task, train_images, progress=not opts.quiet, dtype=store_dtype(opts))
    pixels = round(opts.quality_epochs * int((labels != IGNORE_LABEL).sum()))
    steps = {"ours": math.ceil(pixels / opts.batch), "original": math.ceil(pixels / PAPER_BATCH)}
    if opts.projection_width:  # as the fast recipe: train on the projection, fold back into full members
        _, projected, trainee, fold = projected_trainee(ensemble, store, opts.projection_width, opts.seed)
        fit_ensemble(trainee, projected, labels, steps["ours"], opts)
        for m in range(opts.members):
            fold(m)
    else:
        fit_ensemble(ensemble, store, labels, steps["ours"], opts)
    del store
    X, y, _ = original_training_set(task, train_images, progress=not opts.quiet)
    for m, net in enumerate(progress_bar(nets, desc="original: members one by one", disable=opts.quiet)):
        train_original_member(net, X, y, steps["original"], member_seed(opts.seed, m))
    del X, y

    scores = {name: ConfusionMatrix(opts.classes, IGNORE_LABEL) for name in ("ours", "original", "chance")}
    gen = torch.Generator().manual_seed(opts.seed)
    for j in progress_bar(range(opts.quality_test), desc="quality: held-out images", disable=opts.quiet):
        maps = task.maps(HELD_OUT + 1 + j)
        target = task.labels(maps)
        scores["ours"].update(majority_vote(predict_logits(ensemble, maps, task.image_size)), target)
        scores["original"].update(predict_original(nets, maps, task.image_size), target)
        scores["chance"].update(torch.randint(opts.classes, target.shape, generator=gen), target)
    return {**{f"miou_{name}": matrix.miou() for name, matrix in scores.items()},
            "pixels_per_member": pixels, "steps_per_member": steps}


def measure(opts, say):
    """Both approaches in one process of their own (peak RSS is not this phase's figure); the mIoU gap in points."""
    q = run_isolated(job_quality, opts)
    q["gap_points"] = 100 * abs(q["miou_ours"] - q["miou_original"])
    say(f"quality ({opts.quality_n} train / {opts.quality_test} held-out images, {opts.classes} classes, "
        f"{q['pixels_per_member']} pixels per member = {q['steps_per_member']['ours']} steps of {opts.batch} "
        f"(ours), {q['steps_per_member']['original']} of {PAPER_BATCH} (original)): mIoU ours "
        f"{100 * q['miou_ours']:.2f}, original {100 * q['miou_original']:.2f}, chance {100 * q['miou_chance']:.2f}; "
        f"gap {q['gap_points']:.2f} points")
    return q
