"""The e2e phase: the bedroom_28-shaped experiment end to end. `ddpm-seg train-interpreter` runs as a user
runs it, in a child process, on generated 256x256 scenes (--n training, --test_n test images) with the paper's
UNet at random weights (--random_init: nothing downloaded), steps 50,150,250, blocks 5,6,7,8,12, --members
members and --recipe; its own timings per phase (extract train, train ensemble, evaluate), wall time, peak RSS
and mIoU. The original's cost is computed from its per-image forward (full UNet, float32, one step per
forward) and its training speed (batch 64, float32) over the shortest run its stopping rule allows, both
measured in the same run (the formulas are in the results)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from ..demo_data import render_scene
from ..ensemble import PAPER_BATCH, PATIENCE
from .extraction import e2e_features, e2e_layout, job_e2e_original_forward
from .harness import GB, IGNORE_LABEL, run_isolated
from .training import job_e2e_original_train


def write_scenes(folder, count, size, seed):
    """`count` generated labelled scenes (the demo's shapes) in the official folder layout."""
    os.makedirs(folder)
    for i in range(count):
        image, label = render_scene(np.random.default_rng([seed, i]), size)
        Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.png"))
        np.save(os.path.join(folder, f"{i:05d}.npy"), label)


def e2e_command(opts, exp_path, run_dir):
    """The train-interpreter command line the e2e phase runs."""
    command = [sys.executable, "-m", "ddpm_seg.cli", "train-interpreter", "--exp", exp_path, "--run_dir", run_dir,
               "--random_init", "--no_pictures", "--device", opts.device, "--seed", str(opts.seed),
               "--recipe", opts.recipe, "--extract_dtype", opts.extract_dtype]
    if opts.e2e_batch is not None:
        command += ["--batch_size", str(opts.e2e_batch)]
    if opts.extract_batch is not None:
        command += ["--extract_batch", str(opts.extract_batch)]
    if opts.fp32:
        command += ["--autocast", "none"]
    return command + list(e2e_layout(opts)["flags"])


def job_e2e_ours(opts):
    """train-interpreter end to end in a child process: its timings, wall time, peak RSS and mIoU."""
    layout = e2e_layout(opts)
    root = tempfile.mkdtemp(prefix="ddpm-seg-e2e-")
    try:
        write_scenes(os.path.join(root, "train"), opts.e2e_n, layout["image"], opts.seed)
        write_scenes(os.path.join(root, "test"), opts.test_n, layout["image"], opts.seed + 1)
        labelled = sum(int((np.load(os.path.join(root, "train", f"{i:05d}.npy")) != IGNORE_LABEL).sum())
                       for i in range(opts.e2e_n))
        size = layout["image"]
        cfg = {"exp_dir": os.path.join(root, "runs"), "model_type": "ddpm", "category": "e2e",
               "number_class": layout["classes"], "ignore_label": IGNORE_LABEL,
               "training_path": os.path.join(root, "train"), "testing_path": os.path.join(root, "test"),
               "model_path": "unused (random_init)", "dim": [size, size, e2e_features(opts)],
               "steps": layout["steps"], "blocks": layout["blocks"], "model_num": opts.members,
               "batch_size": PAPER_BATCH, "training_number": opts.e2e_n, "testing_number": opts.test_n,
               "upsample_mode": "bilinear", "share_noise": True, "input_activations": False}
        exp_path = os.path.join(root, "e2e.json")
        with open(exp_path, "w") as f:
            json.dump(cfg, f)
        run_dir = os.path.join(root, "run")
        command = e2e_command(opts, exp_path, run_dir)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads),
                   PYTHONPATH=os.pathsep.join([package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        log_path = os.path.join(root, "log.txt")
        with open(log_path, "w") as log:
            out = log if opts.quiet else None
            start = time.perf_counter()
            child = subprocess.Popen(command, env=env, stdout=out, stderr=out)
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            with open(log_path) as log:
                tail = log.read()[-2000:]
            raise RuntimeError(f"e2e: train-interpreter exited with code {code}\n{tail}")
        with open(os.path.join(run_dir, "metrics.json")) as f:
            metrics = json.load(f)
        with open(os.path.join(run_dir, "settings.json")) as f:
            settings = json.load(f)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    timings = metrics["timings"]
    return {"wall_s": wall, "child_peak_rss": usage.ru_maxrss * 1024, "miou": metrics["miou"],
            "extract_train_s": timings["extract_train_s"], "train_ensemble_s": timings["train_ensemble_s"],
            "evaluate_s": timings["evaluate_s"], "extract_batch": timings["extract_batch"],
            "member_steps": list(timings["member_steps"].values()), "labelled_pixels": labelled,
            "batch_size": settings["batch_size"], "project_s": timings.get("project_s", 0.0),
            "command": " ".join(command[1:]).replace(exp_path, "<exp.json>").replace(run_dir, "<run_dir>")}


def e2e_results(ours, forward, train, opts):
    """Ours as measured, the original computed from its measured forward and training speed."""
    num_steps = len(e2e_layout(opts)["steps"])
    pixels = sum(ours["member_steps"]) * ours["batch_size"]  # our pixel presentations (last batches rounded up)
    # The original's rule never stops a member before 4 epochs over every labelled pixel and 51 more steps of 64:
    # its shortest run, so the original's computed training time is a lower bound.
    original_pixels = opts.members * (4 * ours["labelled_pixels"] + (PATIENCE + 1) * PAPER_BATCH)
    original = {
        "extract_train_s": opts.e2e_n * num_steps * forward["time_s"],
        "train_ensemble_s": original_pixels / train["pixels_per_s"],
        "evaluate_s": opts.test_n * num_steps * forward["time_s"],
        "forward_s": forward["time_s"],
        "forward_peak_rss": forward["peak_rss"],
        "train_pixels_per_s": train["pixels_per_s"],
    }
    original["total_s"] = original["extract_train_s"] + original["train_ensemble_s"] + original["evaluate_s"]
    per_image_ours = ours["extract_train_s"] / opts.e2e_n
    per_image_original = num_steps * forward["time_s"]
    return {
        "ours": ours, "original": original, "pixel_presentations": {"ours": pixels, "original": original_pixels},
        "extract_per_image_s": {"ours": per_image_ours, "original": per_image_original},
        "extract_speedup": per_image_original / per_image_ours,
        "train_speedup": original["train_ensemble_s"] / ours["train_ensemble_s"],
        "evaluate_speedup": original["evaluate_s"] / ours["evaluate_s"],
        "total_speedup": original["total_s"] / ours["wall_s"],
        "formulas": {
            "original extract train": f"n * steps * forward_s = {opts.e2e_n} * {num_steps} * {forward['time_s']:.3f}",
            "original train ensemble": f"members * (4 * labelled pixels + 51 * 64) / original px/s = {opts.members} * "
                                       f"(4 * {ours['labelled_pixels']} + {(PATIENCE + 1) * PAPER_BATCH}) / "
                                       f"{train['pixels_per_s']:.0f} (the shortest run of its stopping rule)",
            "original evaluate": f"test_n * steps * forward_s (UNet only; its full-resolution MLP pass is left out) "
                                 f"= {opts.test_n} * {num_steps} * {forward['time_s']:.3f}",
        },
    }


def measure(opts, say):
    """Our run and the original's forward and training speed, each in its own process; the original computed."""
    ours = run_isolated(job_e2e_ours, opts)
    forward = run_isolated(job_e2e_original_forward, opts)
    forward.pop("pred")
    train = run_isolated(job_e2e_original_train, opts)
    e = e2e_results(ours, forward, train, opts)
    say(f"e2e ({opts.e2e_n} train + {opts.test_n} test images, {opts.members} members, --recipe {opts.recipe}, "
        f"batch {ours['batch_size']}; extract batch {ours['extract_batch']}): ours {ours['wall_s']:.0f} s wall, "
        f"peak RSS {ours['child_peak_rss'] / GB:.2f} GB, mIoU {100 * ours['miou']:.2f} | original computed "
        f"{e['original']['total_s']:.0f} s (forward {forward['time_s']:.2f} s per image and step, "
        f"training {train['pixels_per_s']:.0f} px/s) | extraction {e['extract_speedup']:.2f}x per image")
    return e
