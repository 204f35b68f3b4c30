"""Training a guided-diffusion DDPM on a folder of unlabelled images: `ddpm-seg train-ddpm` and the demo's
retraining run it.

Options and checkpoint files follow guided-diffusion's image_train.py, so checkpoints from either
side load into the other:
    model{step:06d}.pt            plain state_dict of the UNetModel
    ema_{rate}_{step:06d}.pt      the same keys, holding the exponential moving average
    opt{step:06d}.pt              AdamW state_dict
    model_flags.json              the model+diffusion flags that built the model
Here `step` counts completed updates (model000100.pt holds the weights after 100 updates), and
resuming from model{step}.pt continues from that step with the EMA and optimizer saved beside it.
The three are published as a set (model file last), so a kill while saving leaves no partial set; a
rerun into an --out_dir that holds checkpoints resumes from its last complete set. Every set is kept, or with
--keep doubling only those at save_interval x 1, 2, 4, 8, ... steps and the latest.

The data order, timesteps, noise and flips are functions of (seed, step, rank) alone, so a run that
is stopped and resumed follows the same trajectory as one that is not.

Under torchrun (WORLD_SIZE > 1) each process trains on its own shard with DistributedDataParallel
(nccl on CUDA, gloo on CPU); --batch_size is per process and only rank 0 writes files.
"""

import contextlib
import functools
import json
import math
import os
import re
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from guided_diffusion.checkpoint import (
    MODEL_FLAGS_FILENAME,
    load_state_dict_strict,
    read_model_flags,
    read_state_dict,
    safe_load,
)
from guided_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

from .data import IMAGE_EXTENSIONS, list_images, read_image, readable_paths
from .device import distributed
from .files import append_line, atomic_torch_save_set, atomic_write_json, check_writable
from .progress import on_interrupt, progress_bar
from .seeding import derive_seed, seed_everything

LOG_FILENAME = "train_log.jsonl"


def train_defaults():
    """The training flags (image_train.py's, plus max_steps, seed, device, out_dir, precision, num_workers)."""
    return dict(
        data_dir="",
        out_dir="",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,  # > 0: lr decays linearly to 0 and training stops at this step
        max_steps=0,  # > 0: stop at this step (counted across resumes); 0 with no annealing runs forever
        lr_cooldown_steps=0,  # > 0: lr constant, then decays linearly to 0 over the last these steps before max_steps
        batch_size=1,  # per process
        microbatch=-1,  # -1: no gradient accumulation
        ema_rate="0.9999",  # comma-separated list for several EMAs
        log_interval=10,
        save_interval=10000,
        keep="all",  # checkpoint sets kept: all, or doubling (save_interval x 1, 2, 4, 8, ... steps and the last)
        resume_checkpoint="",
        seed=0,
        device="auto",
        precision="fp32",  # fp32 or bf16 (autocast; weights, EMA and optimizer stay float32)
        num_workers=1,
    )


def train_ddpm_defaults():
    """All flags of train-ddpm: model and diffusion flags plus training flags."""
    return {**model_and_diffusion_defaults(), **train_defaults()}


class ImageFolderDataset(Dataset):
    """Images found recursively under a folder, centre-cropped to image_size, as [3, H, W] floats in [-1, 1]."""

    def __init__(self, folder, image_size):
        paths = list_images(folder)
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under data_dir {folder!r}")
        self.paths = readable_paths(paths)  # an unreadable file is named and left out
        if not self.paths:
            raise ValueError(f"none of the {len(paths)} images under data_dir {folder!r} is readable")
        self.image_size = image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = center_crop_arr(Image.fromarray(read_image(self.paths[index])), self.image_size)
        return torch.tensor(image).permute(2, 0, 1).float() / 127.5 - 1


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """Resize the short side to image_size, then crop the centre square (uint8 HxWx3)."""
    scale = image_size / min(image.size)
    # reducing_gap box-filters large images down first, as the official loader does, so bicubic
    # resampling of a much larger image does not alias.
    image = image.resize(
        tuple(max(image_size, round(s * scale)) for s in image.size), Image.BICUBIC, reducing_gap=2.0
    )
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


class ShardedBatchSampler(Sampler):
    """Endless batches, starting at `start_step`. Epoch e is permutation (seed, e) of the images,
    split across ranks, so every batch is determined by (seed, step, rank) and resuming is exact."""

    def __init__(self, num_images, batch_size, seed, rank, world_size, start_step):
        self.per_rank = num_images // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_images} images over {world_size} process(es) leave {self.per_rank} per process, "
                f"fewer than batch_size={batch_size}; use a smaller --batch_size or more images"
            )
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, k = divmod(step, self.batches_per_epoch)
            if k == 0 or step == self.start_step:  # a new epoch, or the one a resumed run starts inside
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_images)
                shard = order[self.rank :: self.world_size][: self.per_rank]
            yield shard[k * self.batch_size : (k + 1) * self.batch_size].tolist()
            step += 1


def step_generator(seed, rank, step):
    """A CPU generator for one step's timesteps, noise and flips, independent of all other steps."""
    return torch.Generator().manual_seed(derive_seed(seed, rank, step))


def parse_resume_step(path):
    """model001000.pt -> 1000; any other name (e.g. a released checkpoint to fine-tune) -> 0."""
    match = re.fullmatch(r"model(\d+)\.pt", os.path.basename(path))
    return int(match.group(1)) if match else 0


def parse_ema_rates(text):
    try:
        rates = [float(r) for r in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--ema_rate must be a comma list of floats like '0.9999', got {text!r}") from None
    if not all(0 <= r < 1 for r in rates):
        raise ValueError(f"--ema_rate values must lie in [0, 1), got {text!r}")
    return rates


def checkpoint_paths(out_dir, step, ema_rates):
    return {
        "model": os.path.join(out_dir, f"model{step:06d}.pt"),
        "ema": {rate: os.path.join(out_dir, f"ema_{rate}_{step:06d}.pt") for rate in ema_rates},
        "opt": os.path.join(out_dir, f"opt{step:06d}.pt"),
    }


class EMA:
    """Moving averages of a model's parameters; state_dict() has the model's keys (buffers copied as is)."""

    def __init__(self, model, rate):
        self.rate = rate
        self.params = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model):
        # One fused call instead of a lerp per tensor: on a GPU, ~200 tiny kernel launches per EMA per step add up.
        params = list(model.named_parameters())
        torch._foreach_lerp_([self.params[name] for name, _ in params], [p.detach() for _, p in params],
                             1 - self.rate)

    def load_state_dict(self, state_dict, source):
        missing = sorted(set(self.params) - set(state_dict))
        if missing:
            raise ValueError(f"EMA checkpoint {source!r} lacks parameters {missing[:5]} of the model")
        for name, p in self.params.items():
            p.copy_(state_dict[name])

    def state_dict(self, model):
        return {name: self.params.get(name, value).detach().cpu() for name, value in model.state_dict().items()}


def _resolve_options(options):
    """The options of train_ddpm_defaults() given in the dict `options` (unknown keys refused), checked."""
    defaults = train_ddpm_defaults()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown train-ddpm options {unknown}; valid options: {sorted(defaults)}")
    opts = SimpleNamespace(**{**defaults, **options})
    if not opts.data_dir:
        raise ValueError("train-ddpm needs --data_dir (a folder of training images)")
    if not opts.out_dir:
        raise ValueError("train-ddpm needs --out_dir (where checkpoints are written)")
    if opts.class_cond:
        raise ValueError("class_cond=True needs class labels, which train-ddpm does not read; use class_cond=False")
    if opts.keep not in ("all", "doubling"):
        raise ValueError(f"--keep must be all or doubling, got {opts.keep!r}")
    if opts.precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be fp32 or bf16, got {opts.precision!r}")
    for name in ("batch_size", "log_interval", "save_interval"):
        if getattr(opts, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(opts, name)}")
    if not opts.lr > 0 or not math.isfinite(opts.lr):
        raise ValueError(f"--lr must be a positive number, got {opts.lr}")
    if opts.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {opts.seed}")
    if opts.lr_cooldown_steps and not 0 < opts.lr_cooldown_steps <= opts.max_steps:
        raise ValueError(f"--lr_cooldown_steps must be between 1 and --max_steps ({opts.max_steps}), "
                         f"got {opts.lr_cooldown_steps}")
    return opts


def _load_saved_state(checkpoint_dir, step, emas, opt):
    """Restore the EMAs and optimizer saved at `step` beside a resumed model (resume_point checked they exist)."""
    saved = checkpoint_paths(checkpoint_dir, step, [ema.rate for ema in emas])
    for ema in emas:
        path = saved["ema"][ema.rate]
        ema.load_state_dict(read_state_dict(path, "EMA checkpoint"), path)
    opt.load_state_dict(safe_load(saved["opt"], "optimizer checkpoint"))


def _apply_weight_decay(opt, opts):
    """Set this run's --weight_decay: a loaded optimizer state carries the saved run's, and a resume with another
    one would otherwise go on at the old one without a word. (The lr is set before every update, learning_rate.)"""
    for group in opt.param_groups:
        group["weight_decay"] = opts.weight_decay


def learning_rate(opts, step):
    """The lr of the update after `step` updates: --lr, times the linear anneal of --lr_anneal_steps, times the
    cooldown of --lr_cooldown_steps. Before its cooldown a run follows the constant-lr trajectory exactly, so the
    checkpoints of a long constant run are those a cooled-down run passes through."""
    lr = opts.lr
    if opts.lr_anneal_steps:
        lr *= 1 - step / opts.lr_anneal_steps
    if opts.lr_cooldown_steps:
        lr *= min(1.0, (opts.max_steps - step) / opts.lr_cooldown_steps)
    return lr


def doubling_step(step, base):
    """True at base, 2 base, 4 base, 8 base, ...: the sets --keep doubling keeps, evenly spaced on a log axis."""
    return step >= base and step % base == 0 and (step // base) & (step // base - 1) == 0


def _save(opts, step, model, emas, opt):
    """One checkpoint set, published model file last (see atomic_torch_save_set): a model{step}.pt on disk
    always has its EMA and optimizer files, and a save cut short leaves no file of the set. With --keep doubling
    the older sets off the doubling steps are then deleted: a 20,000-step run at --save_interval 200 keeps 8 sets
    instead of 100 (3 GB for the demo's DDPM)."""
    ema_rates = [ema.rate for ema in emas]
    paths = checkpoint_paths(opts.out_dir, step, ema_rates)
    atomic_torch_save_set([({k: v.detach().cpu() for k, v in model.state_dict().items()}, paths["model"])]
                          + [(ema.state_dict(model), paths["ema"][ema.rate]) for ema in emas]
                          + [(opt.state_dict(), paths["opt"])])
    if opts.keep == "doubling":
        for old in complete_steps(opts.out_dir, ema_rates):
            if old < step and not doubling_step(old, opts.save_interval):
                old_paths = checkpoint_paths(opts.out_dir, old, ema_rates)
                # The model file first: a deletion cut short leaves orphans, which the next run removes.
                for path in [old_paths["model"], *old_paths["ema"].values(), old_paths["opt"]]:
                    os.remove(path)


def missing_set_files(checkpoint, ema_rates):
    """The EMA and optimizer files a model{step}.pt lacks (an incomplete set: from an older save cut short)."""
    paths = checkpoint_paths(os.path.dirname(os.path.abspath(checkpoint)), parse_resume_step(checkpoint), ema_rates)
    return [os.path.basename(p) for p in [*paths["ema"].values(), paths["opt"]] if not os.path.isfile(p)]


def saved_steps(out_dir):
    """Steps of the model{step}.pt files in out_dir, ascending."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(int(m.group(1)) for m in map(re.compile(r"model(\d+)\.pt").fullmatch, names) if m)


def remove_stale_files(out_dir):
    """Temporary files of saves that were killed, and EMA/optimizer files whose model file never appeared."""
    models = set(saved_steps(out_dir))
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        stale_tmp = re.fullmatch(r"\.(model|ema_|opt).*\.tmp", name)
        orphan = re.fullmatch(r"(ema_[^_]+_|opt)(\d+)\.pt", name)
        if stale_tmp or (orphan and int(orphan.group(2)) not in models):
            os.remove(os.path.join(out_dir, name))


def complete_steps(folder, ema_rates):
    """Steps whose checkpoint set (model, every EMA, optimizer) is whole in folder, ascending."""
    return [s for s in saved_steps(folder)
            if not missing_set_files(checkpoint_paths(folder, s, ema_rates)["model"], ema_rates)]


def resume_point(opts, flags, ema_rates, announce=True):
    """The checkpoint to resume from: --resume_checkpoint, else the last complete set in --out_dir (None: start
    at step 0). A checkpoint set that lacks its EMA or optimizer files is refused, never resumed with fresh ones."""
    if opts.resume_checkpoint:
        missing = parse_resume_step(opts.resume_checkpoint) and missing_set_files(opts.resume_checkpoint, ema_rates)
        if missing and os.path.isfile(opts.resume_checkpoint):
            complete = complete_steps(os.path.dirname(os.path.abspath(opts.resume_checkpoint)), ema_rates)
            other = f"resume from model{complete[-1]:06d}.pt, the last complete set, or " if complete else ""
            raise ValueError(f"--resume_checkpoint {opts.resume_checkpoint}: incomplete checkpoint set, "
                             f"{', '.join(missing)} missing beside it; {other}copy the model file under "
                             "another name to fine-tune its weights with a fresh EMA and optimizer")
        return opts.resume_checkpoint
    steps = saved_steps(opts.out_dir)
    if not steps:
        return None
    # Resuming by default must not mix runs: the folder's checkpoints were made with its model_flags.json.
    saved_flags = read_model_flags(checkpoint_paths(opts.out_dir, steps[-1], ema_rates)["model"])
    if saved_flags is not None and saved_flags != json.loads(json.dumps(flags)):
        differ = sorted(k for k in set(saved_flags) | set(flags) if saved_flags.get(k) != flags.get(k))
        raise ValueError(f"--out_dir {opts.out_dir} holds checkpoints made with other model flags "
                         f"({ {k: saved_flags.get(k) for k in differ} } vs now { {k: flags.get(k) for k in differ} }); "
                         "use another --out_dir")
    complete = complete_steps(opts.out_dir, ema_rates)
    if not complete:
        raise ValueError(f"--out_dir {opts.out_dir} holds model{steps[-1]:06d}.pt but no complete checkpoint set "
                         f"(model, {', '.join(f'ema_{r}' for r in ema_rates)} and opt files of one step); "
                         "use another --out_dir or move those files away")
    path = checkpoint_paths(opts.out_dir, complete[-1], ema_rates)["model"]
    if announce:
        note = f" (model{steps[-1]:06d}.pt is an incomplete set and is not used)" if steps[-1] > complete[-1] else ""
        print(f"resuming from {path}, the last complete checkpoint set in --out_dir{note}; "
              "use another --out_dir to start from step 0", file=sys.stderr)
    return path


def _train_step(model, diffusion, opt, batch, gen, microbatch, autocast):
    """One optimizer update on `batch`; returns the batch's mean loss (a 0-d tensor, not synced)."""
    opt.zero_grad(set_to_none=True)
    n = batch.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    t = torch.randint(0, diffusion.num_timesteps, (n,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    device = next(model.parameters()).device
    x, t, noise = x.to(device), t.to(device), noise.to(device)

    size = n if microbatch <= 0 else microbatch
    total = torch.zeros((), device=device)
    for start in range(0, n, size):
        end = min(start + size, n)
        # DDP all-reduces gradients on every backward; only the last microbatch needs it.
        sync = end == n or not isinstance(model, DistributedDataParallel)
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast():
                losses = diffusion.training_losses(model, x[start:end], t[start:end], noise=noise[start:end])
            # Sum / n: accumulated gradients equal those of the whole batch's mean loss.
            loss = losses["loss"].float().sum() / n
            loss.backward()
        total += loss.detach()
    opt.step()
    return total


def train_ddpm(options):
    """Train a DDPM; `options` is a dict of the options of train_ddpm_defaults() (the rest take their defaults).

    Returns a dict of what the run ended with: step (int), model, opt and model_flags (paths),
    ema ({rate: path}), and log (path of the JSON-lines loss log).
    """
    opts = _resolve_options(options)
    with distributed(opts.device) as (rank, world_size, device):
        return _run(opts, rank, world_size, device)


def _run(opts, rank, world_size, device):
    flags = {k: getattr(opts, k) for k in model_and_diffusion_defaults()}
    ema_rates = parse_ema_rates(opts.ema_rate)
    # The same seed on every rank gives every rank the same initial weights.
    seed_everything(opts.seed)
    model, diffusion = create_model_and_diffusion(**flags)
    model.to(device)
    if device.type == "cuda" and opts.precision == "fp32":
        # cuDNN runs float32 convolutions in TF32 (10-bit mantissa) by default on Ampere and later GPUs.
        torch.backends.cudnn.allow_tf32 = False
    dataset = ImageFolderDataset(opts.data_dir, opts.image_size)
    if rank == 0:
        check_writable(opts.out_dir)
        remove_stale_files(opts.out_dir)

    step = 0
    resume = resume_point(opts, flags, ema_rates, announce=rank == 0)
    if resume:
        step = parse_resume_step(resume)
        load_state_dict_strict(model, read_state_dict(resume), resume)
    emas = [EMA(model, rate) for rate in ema_rates]
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    if step:
        _load_saved_state(os.path.dirname(os.path.abspath(resume)), step, emas, opt)
        _apply_weight_decay(opt, opts)
    end_step = min([s for s in (opts.lr_anneal_steps, opts.max_steps) if s > 0], default=None)

    sampler = ShardedBatchSampler(len(dataset), opts.batch_size, opts.seed, rank, world_size, step)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=opts.num_workers)
    train_model = model
    if world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if opts.precision == "bf16":
        autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    out = {
        "model_flags": os.path.join(opts.out_dir, MODEL_FLAGS_FILENAME),
        "log": os.path.join(opts.out_dir, LOG_FILENAME),
    }
    if rank == 0:
        atomic_write_json(out["model_flags"], flags)
    bar = progress_bar(initial=step, total=end_step, desc="train-ddpm", disable=rank != 0)
    loss_sum, loss_count, saved_step = 0.0, 0, step if resume else None
    with on_interrupt(lambda: interrupted_note(opts.out_dir, ema_rates, step)):
        batches = iter(loader)
        while end_step is None or step < end_step:
            batch = next(batches)
            for group in opt.param_groups:
                group["lr"] = learning_rate(opts, step)
            loss = _train_step(train_model, diffusion, opt, batch, step_generator(opts.seed, rank, step),
                               opts.microbatch, autocast)
            for ema in emas:
                ema.update(model)
            step += 1
            bar.update(1)
            # The logged loss is rank 0's; reading it syncs with the device, so only every log_interval.
            loss_sum, loss_count = loss_sum + loss, loss_count + 1
            if rank == 0 and step % opts.log_interval == 0:
                mean = float(loss_sum) / loss_count
                bar.set_postfix(loss=f"{mean:.4f}", refresh=False)  # shown at the next rate-limited redraw
                append_line(out["log"], json.dumps({"step": step, "loss": mean, "lr": opt.param_groups[0]["lr"]}))
                loss_sum, loss_count = 0.0, 0
            if rank == 0 and step % opts.save_interval == 0:
                _save(opts, step, model, emas, opt)
                saved_step = step
    bar.close()
    if rank == 0 and saved_step != step:
        _save(opts, step, model, emas, opt)
    if world_size > 1:
        # Other ranks wait for rank 0's files before anyone leaves.
        dist.barrier()
    return {"step": step, **checkpoint_paths(opts.out_dir, step, ema_rates), **out}


def interrupted_note(out_dir, ema_rates, step):
    complete = complete_steps(out_dir, ema_rates)
    if not complete:
        return f"stopped after step {step}; no checkpoint was saved yet (the first comes at --save_interval)"
    return (f"stopped after step {step}; the last checkpoint set is model{complete[-1]:06d}.pt (step "
            f"{complete[-1]}) in {out_dir}: run the same command again to resume from it")
