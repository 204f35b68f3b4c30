"""`ddpm-seg bench`: peak memory and speed of our interpreter pipeline beside the original one.

Phases, each approach in its own fresh process so that its peak RSS (ru_maxrss, which never goes
down) is its own:
  store    extraction-to-store: ours puts native-resolution bfloat16 maps into a FeatureStore; the
           original upsamples every map to full resolution in float32 and builds one [N*H*W, D] tensor.
  train    ours trains all members at once (train_ensemble, --batch pixels per member, bf16 matmuls)
           over the store of N images; the original trains nn.Sequential members one after another
           from a shuffled DataLoader over that tensor, batch 64, float32.
  predict  one image, all members, majority vote: predict_logits (first Linear at native resolution)
           against every member on the [H*W, D] full-resolution features.
  quality  both learn the same synthetic task from the same initial members, each member seeing the
           same number of pixels (--quality-epochs passes over the training pixels), each with its
           own batch size; mIoU on held-out images. This is what makes the train speed ratio a ratio
           at equal mIoU: both approaches get equally far through the data, ours in less time.

  e2e      (not run by default) the bedroom_28-shaped experiment end to end: `ddpm-seg train-interpreter`
           run as a user runs it, on generated 256x256 scenes (--n training, --test_n test images) with
           the paper's UNet at random weights (--random_init: nothing downloaded), steps 50,150,250,
           blocks 5,6,7,8,12, --members members, --recipe (default: train-interpreter's, fast). Its own
           timings per phase (extract train, train ensemble, evaluate) and peak RSS, beside the original's
           cost computed from its per-image forward (full UNet, float32, one step per forward) and its
           training speed (batch 64, float32) over the shortest run its stopping rule allows, both
           measured in the same run (see e2e_formulas in the output).

Activations of the other phases are synthetic (deterministic random maps at the chosen layout), so no
checkpoint is needed. The original needs about 2.2 GB per 256x256 image at the paper's layout, so it runs at a
small N and its N-image figures are computed (formulas printed beside them). CPU only, but for e2e's own
run (--device cuda runs train-interpreter on the GPU; the original's figures stay CPU ones): it measures
host memory and CPU time. Linux only (reads /proc and ru_maxrss in KiB).
"""

import argparse
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from PIL import Image

from guided_diffusion.script_util import (add_dict_to_argparser, args_to_dict, create_model_and_diffusion,
                                          model_and_diffusion_defaults)

from .backbones import EXTRACT_DTYPES
from .demo_data import render_scene
from .ensemble import (PAPER_BATCH, PAPER_LR, PATIENCE, MLPEnsemble, hidden_sizes, member_seed, predict_logits,
                       train_ensemble)
from .evaluate import ConfusionMatrix, majority_vote
from .feature_store import FeatureStore, PixelSampler
from .projection import projected_trainee
from .utils import atomic_write_json, cpu_model, derive_seed, fast_bf16, progress_bar

# The paper's DDPM features per diffusion step, (channels, resolution) of the decoder blocks it reads
# (5, 6, 7, 8, 12 of the 256x256 guided-diffusion UNet), at 3 steps: 8448 features per pixel.
PAPER_BLOCKS = [(1024, 32), (512, 32), (512, 32), (512, 64), (256, 128)]
PAPER_STEPS = 3
PAPER_IMAGE = 256
# --small: 1/16 of the channels on a 64x64 image (maps 1/4 the size), for tests.
SMALL_CHANNELS, SMALL_SCALE = 16, 4

PHASES = ("store", "train", "predict", "quality", "e2e")
DEFAULT_PHASES = ("store", "train", "predict", "quality")
SYNTHETIC_N = 50  # --n of the synthetic phases when not given
IGNORE_LABEL = 255
HELD_OUT = 1_000_000  # images from this index on are never trained on
PREDICT_FIT_STEPS = 30  # the predict phase's members are trained a little so their votes mean something
WARMUP_STEPS = 3  # untimed steps first, so one-off kernel setup is not billed to either approach
GB = 1e9

TARGETS = {
    "peak_rss_train": ("ours peak RSS, store + training", "<=", 4.5 * GB),
    "train_speedup": ("training throughput, ours / original", ">=", 5.0),
    "predict_speedup": ("prediction time, original / ours", ">=", 5.0),
    "quality_gap": ("|mIoU ours - original| (points)", "<=", 2.0),
    "predict_agreement": ("pixels where ours and the original agree", ">=", 0.999),
    # bedroom_28's 40 + 20 images with the defaults: 10 min on a 2-core CPU with AMX, 30 min without (see
    # e2e_wall_target); scaled by the images run.
    "e2e_wall": ("e2e: train-interpreter wall time (s)", "<=", 30 * 60),
    "e2e_train_speedup": ("e2e: ensemble training time, original recipe / ours", ">=", 20.0),
    "e2e_peak_rss": ("e2e: train-interpreter peak RSS, UNet included", "<=", 6 * GB),
    "extract_speedup": ("e2e: extraction time per image, original / ours", ">=", 3.0),
}

# ---- e2e: the bedroom_28-shaped experiment ----

# The paper's MODEL_FLAGS for the LSUN 256x256 checkpoints (scripts/ddpm/train_interpreter.sh).
PAPER_MODEL_FLAGS = ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 "
                     "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
                     "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
                     "--use_scale_shift_norm True").split()
# bedroom_28's experiment: its steps, blocks, classes, image size and split sizes.
E2E = dict(flags=PAPER_MODEL_FLAGS, image=256, steps=[50, 150, 250], blocks=[5, 6, 7, 8, 12], classes=29,
           n=40, test_n=20)
# --small: a tiny UNet on 32x32 scenes, for tests.
E2E_SMALL = dict(flags=("--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16 "
                        "--num_head_channels 16 --learn_sigma True --diffusion_steps 100").split(),
                 image=32, steps=[10, 30], blocks=[2, 5], classes=29, n=40, test_n=20)
ORIGINAL_TRAIN_ROWS = 16384  # rows of the random [P, D] tensor the original's training step is timed on


def make_layout(small=False):
    """(map_shapes [(C, h, w)] in extractor order, step-major; image size (H, W))."""
    blocks, image = PAPER_BLOCKS, PAPER_IMAGE
    if small:
        blocks = [(c // SMALL_CHANNELS, s // SMALL_SCALE) for c, s in PAPER_BLOCKS]
        image = PAPER_IMAGE // SMALL_SCALE
    return [(c, s, s) for _ in range(PAPER_STEPS) for c, s in blocks], (image, image)


class SyntheticTask:
    """A stand-in for a feature extractor and its labelled images, deterministic in (seed, image index).

    An image's maps mix a few smooth latent fields (its 'content', shared by every map, as real
    features of one image agree across blocks and steps) into each map's channels, plus independent
    noise. Its labels are the argmax of a fixed random linear 'teacher' over the full-resolution
    features. The teacher reads the features through the mixing (W_k = mixing_k @ V), so it mostly
    sees the latent content: labels form regions, and a pixel classifier can learn them. (A teacher
    with independent random weights would be driven by the noise, which no few-hundred-step student
    can pick out of thousands of channels.)
    """

    rank = 8  # latent fields per image
    noise = 0.5  # std of the per-channel noise; the mixed latent part has std about 1
    latent_stride = 16  # image pixels per latent cell: region size

    def __init__(self, map_shapes, image_size, num_classes, seed=0):
        self.map_shapes, self.image_size = list(map_shapes), tuple(image_size)
        self.num_classes, self.seed = num_classes, seed
        self.dim = sum(c for c, _, _ in self.map_shapes)
        gen = torch.Generator().manual_seed(seed)
        self.mixing = [torch.randn(c, self.rank, generator=gen) / self.rank ** 0.5 for c, _, _ in self.map_shapes]
        readout = torch.randn(self.rank, num_classes, generator=gen)
        self.teacher = [(mixing @ readout).t() / self.dim ** 0.5 for mixing in self.mixing]

    def maps(self, index):
        """Image `index`'s maps, as an extractor hands them over: float32 [C, h, w] in feature order."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, index))
        latent_size = [max(1, s // self.latent_stride) for s in self.image_size]
        latent = torch.randn(1, self.rank, *latent_size, generator=gen)
        out = []
        for mixing, (c, h, w) in zip(self.mixing, self.map_shapes):
            field = F.interpolate(latent, (h, w), mode="bilinear", align_corners=False).view(self.rank, h * w)
            fmap = (mixing @ field).view(c, h, w)
            out.append(fmap.add_(torch.randn(c, h, w, generator=gen), alpha=self.noise))
        return out

    def labels(self, maps):
        """Teacher labels [H, W] (long) of an image's maps.

        The teacher's linear map commutes with bilinear upsampling, so it is applied at each map's
        resolution: the same labels as on the full-resolution features, without building them."""
        logits = 0
        for weight, fmap in zip(self.teacher, maps):
            c, h, w = fmap.shape
            z = (weight @ fmap.reshape(c, h * w)).view(1, self.num_classes, h, w)
            logits = logits + F.interpolate(z, self.image_size, mode="bilinear", align_corners=False)
        return logits[0].argmax(0)


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


# ---- the original approach ----


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


# ---- ours ----


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


def fit_ensemble(ensemble, store, labels, steps, args):
    """train_ensemble for exactly `steps` steps per member of --batch pixels; returns the seconds it took."""
    start = time.perf_counter()
    train_ensemble(ensemble, store, PixelSampler(labels, ignore_label=IGNORE_LABEL), seed=args.seed,
                   batch_size=args.batch, steps=steps, matmul_dtype=torch.bfloat16 if _bf16(args) else None,
                   progress=False)
    return time.perf_counter() - start


# ---- measuring ----


def current_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError("/proc/self/status has no VmRSS line")


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_isolated(job, args, *extra):
    """job(args, *extra) in a fresh process; its result gets that process's base and peak RSS."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child, job, args, *extra).result()


def _child(job, args, *extra):
    torch.set_num_threads(args.threads)
    base = current_rss()
    result = job(args, *extra)
    result.update(base_rss=base, peak_rss=peak_rss())
    return result


def _task(args):
    map_shapes, image_size = make_layout(args.small)
    return SyntheticTask(map_shapes, image_size, args.classes, seed=args.seed)


def _bf16(args):
    """Our first-layer matmuls in bfloat16: unless --fp32, where this CPU has native bf16 (as --autocast auto)."""
    return not args.fp32 and fast_bf16("cpu")


def _store_dtype(args):
    # With bf16 matmuls the features are rounded to bfloat16 before use anyway: store them so.
    return torch.bfloat16 if _bf16(args) else torch.float16


def _scratch_store(args, task, indices):
    """build_store per --store; a disk store lives in a temporary folder, removed right after."""
    if args.store == "ram":
        return build_store(task, indices, progress=not args.quiet, dtype=_store_dtype(args))
    root = tempfile.mkdtemp(prefix="ddpm-seg-bench-")
    try:
        return build_store(task, indices, "disk", root=os.path.join(root, "store"), progress=not args.quiet,
                           dtype=_store_dtype(args))
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the open memmaps stay valid after their files are unlinked


def job_store_ours(args):
    store, _, seconds = _scratch_store(args, _task(args), range(args.n))
    return {"n": args.n, "time_s": seconds, "store_bytes": store.nbytes}


def job_store_original(args):
    X, _, seconds = original_training_set(_task(args), range(args.orig_n), progress=not args.quiet)
    return {"n": args.orig_n, "time_s": seconds, "tensor_bytes": X.numel() * X.element_size()}


def job_train_ours(args):
    task = _task(args)
    store, labels, _ = _scratch_store(args, task, range(args.n))
    ensemble = MLPEnsemble(task.dim, args.classes, args.members, seed=args.seed)
    if args.projection_width:  # the fast recipe's members see the projected features (its fit is not timed here)
        _, store, ensemble, _ = projected_trainee(ensemble, store, args.projection_width, args.seed)
    fit_ensemble(ensemble, store, labels, WARMUP_STEPS, args)
    seconds = fit_ensemble(ensemble, store, labels, args.train_steps, args)
    # Each call starts every member's stream with a shuffle of all N images' labelled pixels, which a real
    # run does once per epoch (every ~3200 steps at N=50, batch 1024): timed alone and taken out.
    sampler = PixelSampler(labels, ignore_label=IGNORE_LABEL)
    start = time.perf_counter()
    for m in range(args.members):
        next(sampler.stream(member_seed(args.seed, m), args.batch))
    setup = time.perf_counter() - start
    pixels = args.members * args.batch * args.train_steps
    return {"n": args.n, "time_s": seconds - setup, "stream_setup_s": setup, "pixels_per_s": pixels / (seconds - setup)}


def job_train_original(args):
    task = _task(args)
    X, y, _ = original_training_set(task, range(args.orig_n), progress=not args.quiet)
    init = MLPEnsemble(task.dim, args.classes, args.members, seed=args.seed)
    train_original_member(original_member(init, 0), X, y, WARMUP_STEPS, args.seed)
    start = time.perf_counter()
    for m in progress_bar(range(args.members), desc="original: members one by one", disable=args.quiet):
        train_original_member(original_member(init, m), X, y, args.train_steps, member_seed(args.seed, m))
    seconds = time.perf_counter() - start
    pixels = args.members * PAPER_BATCH * args.train_steps
    return {"n": args.orig_n, "time_s": seconds, "pixels_per_s": pixels / seconds}


def _timed_runs(runs, predict):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        pred = predict()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "times_s": times, "pred": pred.numpy().astype(np.uint8)}


def job_predict_ours(args):
    """Train a small ensemble briefly (untimed), then time predict_logits + majority_vote on a held-out
    image. Returns the ensemble's weights too, for the original to predict with the same members."""
    task = _task(args)
    store, labels, _ = build_store(task, range(1), progress=False, dtype=_store_dtype(args))
    ensemble = MLPEnsemble(task.dim, args.classes, args.members, seed=args.seed)
    fit_ensemble(ensemble, store, labels, PREDICT_FIT_STEPS, args)
    maps = task.maps(HELD_OUT)
    result = _timed_runs(args.predict_runs, lambda: majority_vote(predict_logits(ensemble, maps, task.image_size)))
    # numpy, not tensors: tensors would travel through shared memory of a process that is exiting.
    result["weights"] = {k: v.numpy() for k, v in ensemble.state_dict().items()}
    return result


def job_predict_original(args, weights):
    task = _task(args)
    ensemble = MLPEnsemble(task.dim, args.classes, args.members)
    ensemble.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    nets = [original_member(ensemble, m).eval() for m in range(args.members)]
    maps = task.maps(HELD_OUT)
    return _timed_runs(args.predict_runs, lambda: predict_original(nets, maps, task.image_size))


def job_quality(args):
    """Both approaches from the same initial members, each member trained on quality_epochs x the labelled
    pixels of quality_n images (ours in batches of --batch, the original in batches of 64); mIoU of each
    ensemble's majority vote on quality_test held-out images, and of random guessing."""
    task = _task(args)
    train_images = range(args.quality_n)
    ensemble = MLPEnsemble(task.dim, args.classes, args.members, seed=args.seed)
    nets = [original_member(ensemble, m) for m in range(args.members)]  # copies of the initial weights

    store, labels, _ = build_store(task, train_images, progress=not args.quiet, dtype=_store_dtype(args))
    pixels = round(args.quality_epochs * int((labels != IGNORE_LABEL).sum()))
    steps = {"ours": math.ceil(pixels / args.batch), "original": math.ceil(pixels / PAPER_BATCH)}
    if args.projection_width:  # as the fast recipe: train on the projection, fold back into full members
        _, projected, trainee, fold = projected_trainee(ensemble, store, args.projection_width, args.seed)
        fit_ensemble(trainee, projected, labels, steps["ours"], args)
        for m in range(args.members):
            fold(m)
    else:
        fit_ensemble(ensemble, store, labels, steps["ours"], args)
    del store
    X, y, _ = original_training_set(task, train_images, progress=not args.quiet)
    for m, net in enumerate(progress_bar(nets, desc="original: members one by one", disable=args.quiet)):
        train_original_member(net, X, y, steps["original"], member_seed(args.seed, m))
    del X, y

    scores = {name: ConfusionMatrix(args.classes, IGNORE_LABEL) for name in ("ours", "original", "chance")}
    gen = torch.Generator().manual_seed(args.seed)
    for j in progress_bar(range(args.quality_test), desc="quality: held-out images", disable=args.quiet):
        maps = task.maps(HELD_OUT + 1 + j)
        target = task.labels(maps)
        scores["ours"].update(majority_vote(predict_logits(ensemble, maps, task.image_size)), target)
        scores["original"].update(predict_original(nets, maps, task.image_size), target)
        scores["chance"].update(torch.randint(args.classes, target.shape, generator=gen), target)
    return {**{f"miou_{name}": matrix.miou() for name, matrix in scores.items()},
            "pixels_per_member": pixels, "steps_per_member": steps}


def _e2e_layout(args):
    return E2E_SMALL if args.small else E2E


def _unet_flags(args):
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, model_and_diffusion_defaults())
    return args_to_dict(parser.parse_args(_e2e_layout(args)["flags"]), model_and_diffusion_defaults().keys())


def _random_unet(args):
    """The e2e UNet at random weights, float32, as --random_init builds it (seeded)."""
    torch.manual_seed(args.seed)
    model, diffusion = create_model_and_diffusion(**{**_unet_flags(args), "use_fp16": False})
    return model.eval(), diffusion


def e2e_features(args):
    """Features per pixel of the e2e layout: every read block's output channels, at every step."""
    layout = _e2e_layout(args)
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**{**_unet_flags(args), "use_fp16": False})
    return len(layout["steps"]) * sum(model.output_blocks[b][0].out_channels for b in layout["blocks"])


def write_scenes(folder, count, size, seed):
    """`count` generated labelled scenes (the demo's shapes) in the official folder layout."""
    os.makedirs(folder)
    for i in range(count):
        image, label = render_scene(np.random.default_rng([seed, i]), size)
        Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.png"))
        np.save(os.path.join(folder, f"{i:05d}.npy"), label)


def e2e_command(args, exp_path, run_dir):
    """The train-interpreter command line the e2e phase runs."""
    command = [sys.executable, "-m", "ddpm_seg.cli", "train-interpreter", "--exp", exp_path, "--run_dir", run_dir,
               "--random_init", "--no_pictures", "--device", args.device, "--seed", str(args.seed),
               "--recipe", args.recipe, "--extract_dtype", args.extract_dtype]
    if args.e2e_batch is not None:
        command += ["--batch_size", str(args.e2e_batch)]
    if args.extract_batch is not None:
        command += ["--extract_batch", str(args.extract_batch)]
    if args.fp32:
        command += ["--autocast", "none"]
    return command + list(_e2e_layout(args)["flags"])


def job_e2e_ours(args):
    """train-interpreter end to end in a child process: its timings, wall time, peak RSS and mIoU."""
    layout = _e2e_layout(args)
    root = tempfile.mkdtemp(prefix="ddpm-seg-e2e-")
    try:
        write_scenes(os.path.join(root, "train"), args.e2e_n, layout["image"], args.seed)
        write_scenes(os.path.join(root, "test"), args.test_n, layout["image"], args.seed + 1)
        labelled = sum(int((np.load(os.path.join(root, "train", f"{i:05d}.npy")) != IGNORE_LABEL).sum())
                       for i in range(args.e2e_n))
        size = layout["image"]
        cfg = {"exp_dir": os.path.join(root, "runs"), "model_type": "ddpm", "category": "e2e",
               "number_class": layout["classes"], "ignore_label": IGNORE_LABEL,
               "training_path": os.path.join(root, "train"), "testing_path": os.path.join(root, "test"),
               "model_path": "unused (random_init)", "dim": [size, size, e2e_features(args)],
               "steps": layout["steps"], "blocks": layout["blocks"], "model_num": args.members,
               "batch_size": PAPER_BATCH, "training_number": args.e2e_n, "testing_number": args.test_n,
               "upsample_mode": "bilinear", "share_noise": True, "input_activations": False}
        exp_path = os.path.join(root, "e2e.json")
        with open(exp_path, "w") as f:
            json.dump(cfg, f)
        run_dir = os.path.join(root, "run")
        command = e2e_command(args, exp_path, run_dir)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                   PYTHONPATH=os.pathsep.join([package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        log_path = os.path.join(root, "log.txt")
        with open(log_path, "w") as log:
            out = log if args.quiet else None
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


def job_e2e_original_forward(args):
    """The original's extraction cost per image and step: one full forward of the float32 UNet on one image
    at one step (it runs a forward per step), timed after one untimed forward; median of --predict-runs."""
    layout = _e2e_layout(args)
    model, diffusion = _random_unet(args)
    image = torch.rand(1, 3, layout["image"], layout["image"]) * 2 - 1
    t = torch.tensor([layout["steps"][0]])
    x_t = diffusion.q_sample(image, t, noise=torch.randn_like(image))
    with torch.no_grad():
        model(x_t, t)
        return _timed_runs(args.predict_runs, lambda: model(x_t, t)[0, 0])


def job_e2e_original_train(args):
    """The original's training speed on the e2e layout: pixels per second of train_original_member (batch 64,
    float32) on a random [ORIGINAL_TRAIN_ROWS, D] tensor (a step's cost does not depend on the data's size)."""
    layout = _e2e_layout(args)
    dim = e2e_features(args)
    gen = torch.Generator().manual_seed(args.seed)
    X = torch.randn(ORIGINAL_TRAIN_ROWS, dim, generator=gen)
    y = torch.randint(layout["classes"], (ORIGINAL_TRAIN_ROWS,), generator=gen, dtype=torch.uint8)
    init = MLPEnsemble(dim, layout["classes"], 1, seed=args.seed)
    train_original_member(original_member(init, 0), X, y, WARMUP_STEPS, args.seed)
    start = time.perf_counter()
    train_original_member(original_member(init, 0), X, y, args.train_steps, args.seed)
    seconds = time.perf_counter() - start
    return {"pixels_per_s": PAPER_BATCH * args.train_steps / seconds, "features": dim}


def e2e_results(ours, forward, train, args):
    """Ours as measured, the original computed from its measured forward and training speed."""
    layout = _e2e_layout(args)
    num_steps = len(layout["steps"])
    pixels = sum(ours["member_steps"]) * ours["batch_size"]  # our pixel presentations (last batches rounded up)
    # The original's rule never stops a member before 4 epochs over every labelled pixel and 51 more steps of 64:
    # its shortest run, so the original's computed training time is a lower bound.
    original_pixels = args.members * (4 * ours["labelled_pixels"] + (PATIENCE + 1) * PAPER_BATCH)
    original = {
        "extract_train_s": args.e2e_n * num_steps * forward["time_s"],
        "train_ensemble_s": original_pixels / train["pixels_per_s"],
        "evaluate_s": args.test_n * num_steps * forward["time_s"],
        "forward_s": forward["time_s"],
        "forward_peak_rss": forward["peak_rss"],
        "train_pixels_per_s": train["pixels_per_s"],
    }
    original["total_s"] = original["extract_train_s"] + original["train_ensemble_s"] + original["evaluate_s"]
    per_image_ours = ours["extract_train_s"] / args.e2e_n
    per_image_original = num_steps * forward["time_s"]
    return {
        "ours": ours, "original": original, "pixel_presentations": {"ours": pixels, "original": original_pixels},
        "extract_per_image_s": {"ours": per_image_ours, "original": per_image_original},
        "extract_speedup": per_image_original / per_image_ours,
        "train_speedup": original["train_ensemble_s"] / ours["train_ensemble_s"],
        "evaluate_speedup": original["evaluate_s"] / ours["evaluate_s"],
        "total_speedup": original["total_s"] / ours["wall_s"],
        "formulas": {
            "original extract train": f"n * steps * forward_s = {args.e2e_n} * {num_steps} * {forward['time_s']:.3f}",
            "original train ensemble": f"members * (4 * labelled pixels + 51 * 64) / original px/s = {args.members} * "
                                       f"(4 * {ours['labelled_pixels']} + {(PATIENCE + 1) * PAPER_BATCH}) / "
                                       f"{train['pixels_per_s']:.0f} (the shortest run of its stopping rule)",
            "original evaluate": f"test_n * steps * forward_s (UNet only; its full-resolution MLP pass is left out) "
                                 f"= {args.test_n} * {num_steps} * {forward['time_s']:.3f}",
        },
    }


# ---- the run ----


def original_peak_formula(base, bytes_per_image, n):
    """Peak RSS of the original's data preparation for n images: the [N, D, H, W] tensor and its
    reshape copy coexist (2n images' worth), and while it is being filled one image's upsampled maps
    and their concatenation add two more (n + 2)."""
    return base + bytes_per_image * max(2 * n, n + 2)


def run_bench(args):
    """Run the selected phases (each approach in its own process); returns the results dict."""
    map_shapes, image_size = make_layout(args.small)
    dim = sum(c for c, _, _ in map_shapes)
    full_bytes = dim * image_size[0] * image_size[1] * 4
    results = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "layout": {"map_shapes": map_shapes, "image_size": list(image_size), "features": dim,
                   "full_res_bytes_per_image": full_bytes,
                   "store_bytes_per_image": sum(c * h * w for c, h, w in map_shapes) * 2},
    }
    say = print if not args.quiet else (lambda *a, **k: None)
    results["cpu"] = cpu_model()
    say(f"CPU: {results['cpu']}")
    say(f"layout: {len(map_shapes)} maps, {dim} features per pixel, {image_size[0]}x{image_size[1]} images; "
        f"full-res float32 {full_bytes / GB:.3f} GB/image, 16-bit store "
        f"{results['layout']['store_bytes_per_image'] / GB:.4f} GB/image; {args.threads} threads")

    def original_at_n(measured):
        """Add the figures computed for N images to a measurement of the original at orig_n."""
        measured["peak_rss_computed"] = original_peak_formula(measured["base_rss"], full_bytes, args.n)
        measured["peak_rss_formula_at_measured_n"] = original_peak_formula(measured["base_rss"], full_bytes,
                                                                           args.orig_n)
        measured["copy_factor_measured"] = (measured["peak_rss"] - measured["base_rss"]) / (args.orig_n * full_bytes)
        return measured

    if "store" in args.phases:
        ours, orig = run_isolated(job_store_ours, args), original_at_n(run_isolated(job_store_original, args))
        orig["time_s_computed"] = orig["time_s"] / args.orig_n * args.n  # every step is linear in N
        results["store"] = {"ours": ours, "original": orig}
        say(f"store: ours {ours['time_s']:.2f} s for N={args.n} ({ours['store_bytes'] / GB:.3f} GB = "
            f"{ours['store_bytes'] / 2**30:.3f} GiB {args.store} store), peak RSS {ours['peak_rss'] / GB:.2f} GB | "
            f"original {orig['time_s']:.2f} s for N={args.orig_n} ({orig['tensor_bytes'] / GB:.2f} GB tensor), "
            f"peak RSS {orig['peak_rss'] / GB:.2f} GB measured (formula {orig['peak_rss_formula_at_measured_n'] / GB:.2f}"
            f" GB, copy factor {orig['copy_factor_measured']:.2f}); computed for N={args.n}: "
            f"{orig['time_s_computed']:.1f} s, peak RSS {orig['peak_rss_computed'] / GB:.1f} GB")

    if "train" in args.phases:
        ours, orig = run_isolated(job_train_ours, args), original_at_n(run_isolated(job_train_original, args))
        speedup = ours["pixels_per_s"] / orig["pixels_per_s"]
        results["train"] = {"ours": ours, "original": orig, "speedup": speedup}
        say(f"train ({args.members} members x {args.train_steps} steps; ours batch {args.batch}, "
            f"{f'{args.projection_width} directions per resolution, ' if args.projection_width else ''}"
            f"{'bf16 matmuls' if _bf16(args) else 'fp32'}; original batch {PAPER_BATCH}, fp32): ours {ours['pixels_per_s']:.0f} px/s "
            f"({ours['time_s']:.2f} s), peak RSS {ours['peak_rss'] / GB:.2f} GB at N={args.n} | original "
            f"{orig['pixels_per_s']:.0f} px/s ({orig['time_s']:.2f} s), peak RSS {orig['peak_rss'] / GB:.2f} GB "
            f"at N={args.orig_n}, computed {orig['peak_rss_computed'] / GB:.1f} GB at N={args.n} | "
            f"speed ratio {speedup:.2f}x")

    if "predict" in args.phases:
        ours = run_isolated(job_predict_ours, args)
        orig = run_isolated(job_predict_original, args, ours.pop("weights"))
        agreement = float((ours.pop("pred") == orig.pop("pred")).mean())
        speedup = orig["time_s"] / ours["time_s"]
        results["predict"] = {"ours": ours, "original": orig, "speedup": speedup, "agreement": agreement}
        say(f"predict (one {image_size[0]}x{image_size[1]} image, {args.members} members, median of "
            f"{args.predict_runs}): ours {ours['time_s']:.3f} s, peak RSS {ours['peak_rss'] / GB:.2f} GB | original "
            f"{orig['time_s']:.3f} s, peak RSS {orig['peak_rss'] / GB:.2f} GB | {speedup:.2f}x faster, "
            f"same label on {100 * agreement:.3f}% of pixels")

    if "e2e" in args.phases:
        ours = run_isolated(job_e2e_ours, args)
        forward = run_isolated(job_e2e_original_forward, args)
        forward.pop("pred")
        train = run_isolated(job_e2e_original_train, args)
        e = results["e2e"] = e2e_results(ours, forward, train, args)
        say(f"e2e ({args.e2e_n} train + {args.test_n} test images, {args.members} members, --recipe {args.recipe}, "
            f"batch {ours['batch_size']}; "
            f"extract batch {ours['extract_batch']}): ours {ours['wall_s']:.0f} s wall, peak RSS "
            f"{ours['child_peak_rss'] / GB:.2f} GB, mIoU {100 * ours['miou']:.2f} | original computed "
            f"{e['original']['total_s']:.0f} s (forward {forward['time_s']:.2f} s per image and step, "
            f"training {train['pixels_per_s']:.0f} px/s) | extraction {e['extract_speedup']:.2f}x per image")

    if "quality" in args.phases:
        q = run_isolated(job_quality, args)
        q["gap_points"] = 100 * abs(q["miou_ours"] - q["miou_original"])
        results["quality"] = q
        say(f"quality ({args.quality_n} train / {args.quality_test} held-out images, {args.classes} classes, "
            f"{q['pixels_per_member']} pixels per member = {q['steps_per_member']['ours']} steps of {args.batch} "
            f"(ours), {q['steps_per_member']['original']} of {PAPER_BATCH} (original)): mIoU ours {100 * q['miou_ours']:.2f}, original "
            f"{100 * q['miou_original']:.2f}, chance {100 * q['miou_chance']:.2f}; gap {q['gap_points']:.2f} points")

    results["targets"] = check_targets(results)
    results["formulas"] = dict(results.get("e2e", {}).get("formulas", {}))
    if any(phase in results for phase in DEFAULT_PHASES):
        results["formulas"].update({
            "original_peak_rss_at_N": f"base RSS + B * max(2N, N + 2), B = D*H*W*4 = {full_bytes} bytes per image "
                                      "(full-res tensor + its reshape copy; N + 2 while filling)",
            "original_store_time_at_N": "measured time / orig_n * N",
        })
    return results


def e2e_wall_target(results):
    """Seconds the e2e run may take: 10 min for bedroom_28's 60 images on a CPU with AMX, 30 min on others,
    in proportion to the images run."""
    images = results["config"]["e2e_n"] + results["config"]["test_n"]
    minutes = 10 if "amx_bf16" in results["cpu"] else 30
    return minutes * 60 * images / (E2E["n"] + E2E["test_n"])


def check_targets(results):
    values = {
        "peak_rss_train": results.get("train", {}).get("ours", {}).get("peak_rss"),
        "train_speedup": results.get("train", {}).get("speedup"),
        "predict_speedup": results.get("predict", {}).get("speedup"),
        "quality_gap": results.get("quality", {}).get("gap_points"),
        "predict_agreement": results.get("predict", {}).get("agreement"),
        "e2e_wall": results.get("e2e", {}).get("ours", {}).get("wall_s"),
        "e2e_peak_rss": results.get("e2e", {}).get("ours", {}).get("child_peak_rss"),
        "extract_speedup": results.get("e2e", {}).get("extract_speedup"),
        "e2e_train_speedup": results.get("e2e", {}).get("train_speedup"),
    }
    targets = {}
    for name, value in values.items():
        if value is None:
            continue
        what, op, bound = TARGETS[name]
        if name == "e2e_wall":
            bound = e2e_wall_target(results)
        met = value <= bound if op == "<=" else value >= bound
        targets[name] = {"what": what, "value": value, "target": f"{op} {bound:g}", "met": bool(met)}
    return targets


def _gb(x):
    return f"{x / GB:.2f} GB"


def _sec(x):
    return f"{x:.3f} s" if x < 10 else f"{x:.0f} s"


def format_table(results):
    """The summary: phase | ours | original (measured at small N; computed at N) | ratio | target | met?"""
    cfg, t = results["config"], results["targets"]
    n, orig_n = cfg["n"], cfg["orig_n"]
    synthetic = any(phase in results for phase in DEFAULT_PHASES)
    original = f"original (measured @N={orig_n}; computed @N={n})" if synthetic else "original (computed)"
    rows = [("phase", "ours", original, "ratio", "target", "met?")]

    def met(*names):
        return ", ".join("yes" if t[k]["met"] else "NO" for k in names)

    if "store" in results:
        o, g = results["store"]["ours"], results["store"]["original"]
        rows.append(("store", f"{_sec(o['time_s'])}, peak {_gb(o['peak_rss'])} @N={n}",
                     f"{_sec(g['time_s'])}, peak {_gb(g['peak_rss'])}; {_sec(g['time_s_computed'])}, "
                     f"peak {_gb(g['peak_rss_computed'])}",
                     f"{g['peak_rss_computed'] / o['peak_rss']:.1f}x less memory", "-", "-"))
    if "train" in results:
        o, g = results["train"]["ours"], results["train"]["original"]
        rows.append(("train", f"{o['pixels_per_s']:.0f} px/s, peak {_gb(o['peak_rss'])} @N={n}",
                     f"{g['pixels_per_s']:.0f} px/s, peak {_gb(g['peak_rss'])}; peak {_gb(g['peak_rss_computed'])}",
                     f"{results['train']['speedup']:.2f}x", "speed >= 5x; peak <= 4.5 GB",
                     met("train_speedup", "peak_rss_train")))
    if "predict" in results:
        o, g = results["predict"]["ours"], results["predict"]["original"]
        rows.append(("predict", f"{_sec(o['time_s'])}, peak {_gb(o['peak_rss'])}",
                     f"{_sec(g['time_s'])}, peak {_gb(g['peak_rss'])}",
                     f"{results['predict']['speedup']:.2f}x; agree {100 * results['predict']['agreement']:.3f}%",
                     ">= 5x; agree >= 99.9%", met("predict_speedup", "predict_agreement")))
    if "quality" in results:
        q = results["quality"]
        rows.append(("quality", f"mIoU {100 * q['miou_ours']:.2f}", f"mIoU {100 * q['miou_original']:.2f}",
                     f"gap {q['gap_points']:.2f} pt (chance {100 * q['miou_chance']:.2f})", "gap <= 2 pt",
                     met("quality_gap")))
    if "e2e" in results:
        e, o, g = results["e2e"], results["e2e"]["ours"], results["e2e"]["original"]
        n, test_n = cfg["e2e_n"], cfg["test_n"]
        rows.append((f"e2e extract train ({n})", _sec(o["extract_train_s"]), _sec(g["extract_train_s"]),
                     f"{g['extract_train_s'] / o['extract_train_s']:.2f}x", "-", "-"))
        rows.append(("e2e extract per image", _sec(e["extract_per_image_s"]["ours"]),
                     _sec(e["extract_per_image_s"]["original"]), f"{e['extract_speedup']:.2f}x", ">= 3x",
                     met("extract_speedup")))
        rows.append(("e2e train ensemble", _sec(o["train_ensemble_s"]), _sec(g["train_ensemble_s"]),
                     f"{e['train_speedup']:.2f}x", ">= 20x", met("e2e_train_speedup")))
        rows.append((f"e2e evaluate ({test_n})", _sec(o["evaluate_s"]), _sec(g["evaluate_s"]),
                     f"{e['evaluate_speedup']:.2f}x", "-", "-"))
        rows.append(("e2e total", f"{_sec(o['wall_s'])} wall, peak {_gb(o['child_peak_rss'])}",
                     f"{_sec(g['total_s'])}", f"{e['total_speedup']:.2f}x",
                     f"<= {t['e2e_wall']['target'].split()[1]} s; peak <= 6 GB",
                     met("e2e_wall", "e2e_peak_rss")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join([f"CPU: {results['cpu']}"] + lines)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def phase_list(text):
    phases = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if not phases or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(PHASES)}, got {text!r}")
    return phases


def build_parser():
    parser = argparse.ArgumentParser(prog="ddpm-seg bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=positive_int, default=None,
                        help=f"training images: for our store and training ({SYNTHETIC_N} if not given), and for "
                             f"e2e ({E2E['n']}, bedroom_28's, if not given)")
    parser.add_argument("--test_n", "--test-n", type=positive_int, default=E2E["test_n"],
                        help="e2e: test images (bedroom_28's 20)")
    parser.add_argument("--extract_dtype", "--extract-dtype", choices=["auto"] + sorted(EXTRACT_DTYPES),
                        default="auto", help="e2e: train-interpreter's --extract_dtype")
    parser.add_argument("--extract_batch", "--extract-batch", type=positive_int, default=None,
                        help="e2e: train-interpreter's --extract_batch (default: its own, from free memory)")
    parser.add_argument("--orig-n", type=positive_int, default=2,
                        help="training images for the original approach (about 2.2 GB each at the paper layout)")
    parser.add_argument("--members", type=positive_int, default=10)
    parser.add_argument("--train-steps", type=positive_int, default=200, help="timed training steps per member")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="torch threads per phase")
    parser.add_argument("--phases", type=phase_list, default=list(DEFAULT_PHASES),
                        help=f"any of {','.join(PHASES)} (default {','.join(DEFAULT_PHASES)})")
    parser.add_argument("--store", choices=["ram", "disk"], default="ram", help="where our store keeps its maps")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="our pixels per member per step, Adam lr 1e-3 * sqrt(batch / 64) (the original keeps "
                             "the paper's 64 and 1e-3); default 1024, and in e2e train-interpreter's own default")
    parser.add_argument("--device", default="cpu", help="e2e: train-interpreter's --device (cpu, cuda, auto)")
    parser.add_argument("--recipe", choices=["fast", "paper"], default="fast",
                        help="e2e: train-interpreter's --recipe (the default, fast; or the paper's)")
    parser.add_argument("--projection_width", "--projection-width", type=int, default=0,
                        help="train, quality: ours on the features projected to this many principal directions per "
                             "resolution, as train-interpreter's fast recipe (default 0: all features)")
    parser.add_argument("--fp32", action="store_true",
                        help="our first-layer matmuls in float32 (float16 store) even where this CPU has native "
                             "bfloat16 (without it they are float32 anyway, as train-interpreter's --autocast auto)")
    parser.add_argument("--classes", type=positive_int, default=10, help="classes of the synthetic task")
    parser.add_argument("--predict-runs", type=positive_int, default=3, help="timed predictions (median reported)")
    parser.add_argument("--quality-n", type=positive_int, default=2, help="training images of the quality check")
    parser.add_argument("--quality-test", type=positive_int, default=2, help="held-out images of the quality check")
    parser.add_argument("--quality-epochs", type=positive_float, default=1.0,
                        help="passes over the training pixels per member in the quality check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true",
                        help="a tiny layout (64x64 images, 1/16 of the channels; e2e: a tiny UNet on 32x32 images)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or phase lines, only the table")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def main(argv):
    args = build_parser().parse_args(argv)
    args.e2e_n = args.n or (E2E_SMALL if args.small else E2E)["n"]
    args.e2e_batch, args.batch = args.batch, args.batch or 1024
    args.n = args.n or SYNTHETIC_N
    if args.classes < 2:
        raise ValueError(f"--classes must be at least 2, got {args.classes}")
    results = run_bench(args)
    print(format_table(results))
    for name, formula in results["formulas"].items():
        print(f"{name}: {formula}")
    if args.json:
        atomic_write_json(args.json, results)
