"""Making a synthetic dataset (DatasetDDPM): sample images from the DDPM and label them with a trained ensemble,
in chunks a stopped run resumes from, merged into one .npz of the original's layout; under torchrun each process
makes its share of the chunks. `ddpm-seg generate-dataset` runs it; its help describes the file and the resume
rules.
"""

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from guided_diffusion.script_util import create_gaussian_diffusion, diffusion_defaults

from .backbones import dtype_name, extract_dtype
from .config import check_paths, run_dir
from .data import synthetic_dataset_path
from .device import distributed
from .files import atomic_path, atomic_write_json, check_settings, check_writable, folder_lock
from .fingerprint import files_sha256, path_sha256
from .interpreter import Interpreter, member_path, run_extract_dtype
from .progress import on_interrupt, progress_bar
from .seeding import derive_seed

INDEX_NAME = "index.json"
# The sampling options, in the order of the original generate_dataset.py's flags.
SAMPLING_OPTIONS = ("num_samples", "batch_size", "sample_seed", "use_ddim", "clip_denoised")


@dataclass(frozen=True)
class GenerateOptions:
    """What generate-dataset samples, from which ensemble, and where it writes: its flags, typed, with their
    defaults (the sampling ones are the original generate_dataset.py's)."""
    num_samples: int = 10000  # samples in the final file
    batch_size: int = 16  # samples per chunk, sampled as one batch by one process
    sample_seed: int = 0  # seed of the sampling noise: sample i's generator is seeded with (sample_seed, i)
    use_ddim: bool = False  # DDIM (eta = 0) instead of ancestral sampling
    clip_denoised: bool = True  # clip each step's predicted x_0 to [-1, 1]
    seed: int = 0  # seed of the trained ensemble run (its folder and its shared feature noise)
    run_dir: Optional[str] = None  # the ensemble's folder (None: <exp_dir>/<suffix>/seed_<seed>)
    out_dir: Optional[str] = None  # where the .npz goes (None: the ensemble's folder)
    device: str = "auto"  # auto | cpu | cuda[:i] (under torchrun: cuda:LOCAL_RANK)
    extract_dtype: str = "auto"  # precision of the backbone's forward, for sampling and labelling alike
    extract_batch: Optional[int] = None  # images per backbone forward (None: chosen by the device's memory)


def sampling_options(opts) -> dict:
    """{name: value} of the SAMPLING_OPTIONS of `opts` (of GenerateOptions itself: their defaults)."""
    return {k: getattr(opts, k) for k in SAMPLING_OPTIONS}


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample `index`'s sampling noise: a function of its arguments alone."""
    return derive_seed(seed, index)


def sampling_diffusion(flags: dict):
    """The diffusion to sample with: the model's own, respaced by flags['timestep_respacing']."""
    opts = {k: flags[k] for k in diffusion_defaults()}
    opts["steps"] = opts.pop("diffusion_steps")
    return create_gaussian_diffusion(**opts)


@torch.no_grad()
def sample_images(model, diffusion, indices, seed, image_size, use_ddim=False, clip_denoised=True) -> np.ndarray:
    """Samples `indices` as one batch -> uint8 [B, H, W, 3].

    Ancestral sampling draws x_T and each step's noise from a per-sample generator on the model's
    device, so sample i is the same in any batch position and on any rank. DDIM here is eta = 0,
    which adds no noise after x_T.
    """
    device = next(model.parameters()).device
    generators = [torch.Generator(device=device).manual_seed(sample_seed(seed, i)) for i in indices]

    def noise():
        return torch.stack([torch.randn(3, *image_size, generator=g, device=device) for g in generators])

    x = noise()
    for step in reversed(range(diffusion.num_timesteps)):
        t = torch.full((len(indices),), step, dtype=torch.long, device=device)
        if use_ddim:
            x = diffusion.ddim_sample(model, x, t, clip_denoised=clip_denoised)["sample"]
        else:
            out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
            # The last step returns the mean: there is no x_{-1} to add noise for.
            x = out["mean"] if step == 0 else out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise()
    # Truncating conversion, as guided-diffusion's samplers and the original generate_dataset.py write images.
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def label_images(interpreter, images):
    """uint8 images [B, H, W, 3] -> (uint8 labels [B, H, W], float32 uncertainty scores [B]), as on real images.
    An image's features do not depend on the images beside it (with or without share_noise), so neither do
    its labels."""
    results = interpreter.segment(images)
    return np.stack([label for label, _, _ in results]), np.array([s for _, _, s in results], dtype=np.float32)


def chunk_ranges(num_samples: int, batch_size: int) -> list:
    return [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]


def shard_dir(out_path: str) -> str:
    return os.path.splitext(out_path)[0] + "_shards"


def chunk_path(folder: str, k: int) -> str:
    return os.path.join(folder, f"chunk_{k:06d}.npz")


def save_npz(path: str, *arrays, **named) -> None:
    """np.savez through a file object (np.savez would append .npz to the temporary name), atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, *arrays, **named)


def save_chunk(path, indices, images, labels, scores):
    save_npz(path, indices=np.asarray(indices, dtype=np.int64), images=images, labels=labels, uncertainties=scores)


def wait_for_chunks(folder: str, num_chunks: int, poll_s: float = 2.0) -> None:
    """Wait until every chunk is on disk. Rank 0 polls the files instead of a collective barrier: the last
    ranks may still sample a whole chunk, longer than NCCL's default timeout of 10 minutes. (If a rank
    fails, torchrun stops this one too.)"""
    while not all(os.path.isfile(chunk_path(folder, k)) for k in range(num_chunks)):
        time.sleep(poll_s)


def merge_shards(folder: str, chunks: list, out_path: str) -> None:
    """Concatenate the chunks in index order into the original 3-array .npz, then drop the chunk files."""
    parts = []
    for k, (start, end) in enumerate(chunks):
        with np.load(chunk_path(folder, k)) as shard:
            if not np.array_equal(shard["indices"], np.arange(start, end)):
                raise ValueError(f"{chunk_path(folder, k)}: holds samples {shard['indices'].tolist()}, "
                                 f"expected {start}..{end - 1}")
            parts.append((shard["images"], shard["labels"], shard["uncertainties"]))
    images, labels, scores = (np.concatenate(a) for a in zip(*parts))
    save_npz(out_path, images, labels, scores)
    for k in range(len(chunks)):
        os.remove(chunk_path(folder, k))


def split_finished_file(out_path: str, folder: str, chunks: list) -> None:
    """Turn the samples of an earlier, smaller finished run back into chunks, so that a larger --num_samples
    only makes the samples it lacks (a last, partial chunk is made again at its new size)."""
    with np.load(out_path) as npz:
        images, labels, scores = (npz[k] for k in ("arr_0", "arr_1", "arr_2"))
    for k, (start, end) in enumerate(chunks):
        if end <= len(images) and not os.path.isfile(chunk_path(folder, k)):
            save_chunk(chunk_path(folder, k), range(start, end), images[start:end], labels[start:end],
                       scores[start:end])


def check_options(cfg, exp_path, opts: GenerateOptions):
    if cfg.model_type != "ddpm":
        raise ValueError(f"{exp_path}: generate-dataset samples from a DDPM; model_type is {cfg.model_type!r}")
    if cfg.dim[0] != cfg.dim[1]:
        raise ValueError(f"{exp_path}: the DDPM makes square images; dim is {cfg.dim[:2]}")
    if cfg.number_class > 256 or not 0 <= cfg.ignore_label <= 255:
        raise ValueError(f"{exp_path}: labels are stored as uint8, so number_class must be <= 256 and "
                         f"ignore_label in 0..255 (got {cfg.number_class}, {cfg.ignore_label})")
    for key in ("num_samples", "batch_size"):
        if getattr(opts, key) < 1:
            raise ValueError(f"--{key} must be >= 1, got {getattr(opts, key)}")


def generate_dataset(cfg, exp_path, model_flags, opts: GenerateOptions):
    """Sample and label opts.num_samples images of the experiment `cfg` (read from exp_path) with the model
    flags `model_flags`, in one process or as one rank of a torchrun job; returns {"path", "num_samples",
    "new_samples", "seconds", "samples_per_s"} (other ranks than 0 return None for the path and the rate)."""
    check_options(cfg, exp_path, opts)
    check_paths(cfg, ["model_path"], exp_path)
    with distributed(opts.device) as (rank, world_size, device):
        return _run(cfg, exp_path, model_flags, opts, rank, world_size, device)


def _run(cfg, exp_path, flags, opts, rank, world_size, device):
    ensemble_dir = opts.run_dir or run_dir(cfg, opts.seed)
    dtype = run_extract_dtype(ensemble_dir, opts.extract_dtype)  # label as the run's evaluation did
    size = tuple(cfg.dim[:2])
    out_path = synthetic_dataset_path(opts.out_dir or ensemble_dir, size)
    folder = shard_dir(out_path)
    # num_samples is left out: sample i does not depend on it, so a finished run can be extended.
    # The checkpoint's and the members' contents too: samples made or labelled by others are never mixed in.
    settings = {**{k: v for k, v in sampling_options(opts).items() if k != "num_samples"}, "seed": opts.seed,
                "exp": cfg.to_dict(), "model_flags": flags, "ensemble_dir": os.path.abspath(ensemble_dir),
                "model_sha256": path_sha256(cfg.model_path),
                "extract_dtype": dtype_name(extract_dtype(dtype, device, bool(flags.get("use_fp16"))))}
    # Features on the full process the ensemble was trained with; sampling on the (maybe respaced) one.
    # Both are built before anything is written, so a wrong --seed or --run_dir leaves no folder behind.
    interpreter = Interpreter.build(cfg, flags, ensemble_dir, opts.seed, device=device, extract_dtype=dtype,
                                    extract_batch=opts.extract_batch, config_path=exp_path)
    settings["ensemble_sha256"] = files_sha256([member_path(ensemble_dir, m) for m in range(cfg.model_num)])
    diffusion = sampling_diffusion(flags)
    chunks = chunk_ranges(opts.num_samples, opts.batch_size)
    if rank == 0:
        check_writable(folder)
    os.makedirs(folder, exist_ok=True)
    with folder_lock(folder, "generate-dataset") if rank == 0 else contextlib.nullcontext():
        with on_interrupt(lambda: interrupted_note(folder, chunks)):
            return _generate(interpreter, diffusion, settings, opts, chunks, out_path, folder, size, rank,
                             world_size)


def interrupted_note(folder, chunks):
    done = sum(os.path.isfile(chunk_path(folder, k)) for k in range(len(chunks)))
    return f"{done} of {len(chunks)} chunks saved in {folder}; run the same command again to resume"


def _generate(interpreter, diffusion, settings, opts, chunks, out_path, folder, size, rank, world_size):
    # The index is written with the first chunk, once sampling and labelling have worked with these settings:
    # a run refused or failed before that leaves nothing that would refuse its corrected rerun.
    index_path = os.path.join(folder, INDEX_NAME)
    check_settings(index_path, settings, write=False)
    if os.path.isfile(out_path):
        with np.load(out_path) as npz:
            finished = len(npz["arr_1"])
        if finished == opts.num_samples:
            print(f"{out_path} is complete ({finished} samples); nothing to do")
            return {"path": out_path, "num_samples": opts.num_samples, "new_samples": 0, "seconds": 0.0,
                    "samples_per_s": None}
        if finished > opts.num_samples:
            raise ValueError(f"{out_path} already holds {finished} samples, more than --num_samples "
                             f"{opts.num_samples}; use its first {opts.num_samples} or another --out_dir")
        split_finished_file(out_path, folder, chunks)  # on every rank: chunk files are written atomically
    missing = [k for k in range(len(chunks)) if not os.path.isfile(chunk_path(folder, k))]
    mine = [k for k in missing if k % world_size == rank]
    new_samples = sum(chunks[k][1] - chunks[k][0] for k in missing)
    if rank == 0:
        method = "DDIM" if opts.use_ddim else "ancestral"
        print(f"{new_samples} of {opts.num_samples} samples to make ({method}, {diffusion.num_timesteps} steps) "
              f"on {world_size} process(es); chunks in {folder}")

    start = time.time()
    bar = progress_bar(total=sum(chunks[k][1] - chunks[k][0] for k in mine), unit="sample",
                       desc=f"generate (rank {rank})" if world_size > 1 else "generate", disable=rank != 0)
    for k in mine:
        indices = range(*chunks[k])
        images = sample_images(interpreter.backbone_network, diffusion, indices, opts.sample_seed, size,
                               opts.use_ddim, opts.clip_denoised)
        # 1 until the extractor has seen an image and knows its memory per image.
        labels, scores = label_images(interpreter, images)
        if not os.path.isfile(index_path):
            atomic_write_json(index_path, settings)
        save_chunk(chunk_path(folder, k), indices, images, labels, scores)
        bar.update(len(indices))
    bar.close()
    if rank != 0:
        return {"path": None, "num_samples": opts.num_samples, "new_samples": new_samples,
                "seconds": time.time() - start, "samples_per_s": None}
    wait_for_chunks(folder, len(chunks))
    seconds = time.time() - start
    rate = new_samples / seconds if new_samples and seconds > 0 else None
    merge_shards(folder, chunks, out_path)
    if rate is not None:
        print(f"{new_samples} samples in {seconds:.1f} s: {rate:.3f} samples/s over {world_size} process(es)")
    print(f"saved {out_path}")
    return {"path": out_path, "num_samples": opts.num_samples, "new_samples": new_samples, "seconds": seconds,
            "samples_per_s": rate}
