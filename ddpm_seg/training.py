"""Training an interpreter: extract the training features into a store, train the ensemble members that
are missing from the run folder, then evaluate on the test images. `ddpm-seg train-interpreter` and the
demo run it.

One run = one seed, in <exp_dir>/<steps_blocks>/seed_<seed>/. Members already saved there are kept,
so a stopped run resumes with the members it has not saved yet.
"""

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .backbones import (create_feature_extractor, dtype_name, extract_batch_size, extract_batches, extract_dtype,
                        memory_per_image)
from .config import check_paths, run_dir
from .data import load_split
from .device import available_memory_bytes, fast_bf16, resolve_device
from .ensemble import MLPEnsemble
from .feature_store import FeatureStore, PixelSampler
from .files import atomic_write_json, check_settings, check_writable, read_json_object
from .fingerprint import data_sha256, path_sha256, short
from .interpreter import SETTINGS_NAME, Interpreter, evaluate, member_path
from .progress import progress_bar
from .recipe import FAST_EPOCHS, PROJECTION_WIDTH, make_recipe, train_members
from .seeding import seed_everything

AUTOCAST = {"none": None, "bf16": torch.bfloat16}
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# RAM store only while the features take less than this share of the memory available now.
RAM_STORE_SHARE = 0.5


@dataclass(frozen=True)
class TrainOptions:
    """How one seed's run is trained and evaluated: train-interpreter's flags, typed, with their defaults."""
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:i]
    store: str = "auto"  # ram | disk | auto: RAM while the features take less than RAM_STORE_SHARE of the memory
    autocast: str = "auto"  # none | bf16 | auto (resolve_autocast)
    store_dtype: str = "auto"  # a STORE_DTYPES name, or auto (store_dtype_name)
    extract_dtype: str = "auto"  # an --extract_dtype name (ddpm_seg.backbones.EXTRACT_DTYPES) or auto
    extract_batch: Optional[int] = None  # images per backbone forward (None: chosen by the device's memory)
    recipe: str = "fast"  # a RECIPES name
    epochs: int = FAST_EPOCHS  # --recipe fast: epochs per member before the last 51 steps (0: the paper's rule)
    projection_width: int = PROJECTION_WIDTH  # --recipe fast: principal directions per resolution (0: none)
    batch_size: Optional[int] = None  # pixels per member per step (None: the recipe's)
    lr: Optional[float] = None  # Adam learning rate (None: 1e-3 * sqrt(batch_size / 64))
    random_init: bool = False  # the backbone at random initialisation instead of model_path
    run_dir: Optional[str] = None  # the run folder (None: <exp_dir>/<steps_blocks>/seed_<seed>)
    pictures: bool = True  # per-image PNGs of the test predictions
    eval_only: bool = False  # evaluate the members in the run folder, train nothing


def resolve_autocast(name, device):
    """--autocast auto -> bf16 where bf16 matmuls are fast (emulated bf16 is 15-50x slower than float32), else none."""
    if name != "auto":
        return name
    return "bf16" if fast_bf16(device) else "none"


def store_dtype_name(store_dtype, autocast):
    """--store_dtype auto -> bfloat16 under --autocast bf16 (the features are rounded to bfloat16 before the
    matmul anyway), else float16."""
    if store_dtype != "auto":
        return store_dtype
    return "bfloat16" if AUTOCAST[autocast] == torch.bfloat16 else "float16"


def check_feature_size(cfg, maps, exp_path):
    total = sum(m.shape[0] for m in maps)
    if total != cfg.dim[-1]:
        source = (f"steps {cfg.steps} x blocks {cfg.blocks} of this model" if cfg.steps
                  else f"the {cfg.model_type} backbone")
        raise ValueError(f"{exp_path}: dim[-1] is {cfg.dim[-1]} but {source} give(s) {total} features per pixel; "
                         f"set dim[-1] to {total}")


def extract_training_store(extractor, items, first_maps, store_root, store="auto", dtype=torch.float16, batch_size=1):
    """Extract every training image's maps into a FeatureStore of `dtype` (resuming a disk store that was cut
    short), batch_size images per extractor call; `store` as TrainOptions.store."""
    shapes = [tuple(m.shape) for m in first_maps]
    per_image = sum(c * h * w for c, h, w in shapes) * torch.finfo(dtype).bits // 8
    use_disk = store == "disk" or (
        store == "auto" and per_image * len(items) > RAM_STORE_SHARE * available_memory_bytes())
    store = FeatureStore(shapes, items[0].label.shape, len(items), dtype=dtype, root=store_root if use_disk else None)
    todo = store.missing()
    bar = progress_bar(total=len(todo), desc="extract train features")
    if todo[:1] == [0]:
        store.put(0, first_maps)
        todo = todo[1:]
        bar.update(1)
    for chunk, maps in extract_batches(extractor, [items[i].image for i in todo], batch_size):
        for j, k in enumerate(chunk):
            store.put(todo[k], [m[j] for m in maps])
        bar.update(len(chunk))
    bar.close()
    return store


def training_sampler(cfg, items):
    return PixelSampler(torch.from_numpy(np.stack([it.label for it in items])), ignore_label=cfg.ignore_label)


def interrupted_note(cfg, folder):
    """What a stopped run leaves for the next one: saved members, and the cached features of a disk store."""
    saved = [m for m in range(cfg.model_num) if os.path.exists(member_path(folder, m))]
    cached = " and the features extracted so far (disk store)" if os.path.isdir(os.path.join(folder, "features")) else ""
    return (f"{len(saved)} of {cfg.model_num} members saved in {folder}{cached}; "
            "run the same command again to resume")


# What makes a member's input features: a finished folder is only evaluated with the same (paths, the data and
# the training recipe may differ: evaluating elsewhere, or members made by the original code).
FEATURE_KEYS = ("model_type", "dim", "steps", "blocks", "share_noise", "input_activations", "upsample_mode",
                "number_class", "model_num", "noise_draws", "prompt")


def identity(settings):
    """What of a run folder's settings makes its members' input features: the config's FEATURE_KEYS, the model
    flags but use_fp16 (a device choice) and timestep_respacing (a sampler's; features always use the full
    noising process), the checkpoint's content, the seed (the shared noise) and random_init."""
    flags = settings.get("model_flags") or {}
    return {"features": {k: (settings.get("config") or {}).get(k) for k in FEATURE_KEYS},
            "model_flags": {k: v for k, v in flags.items() if k not in ("use_fp16", "timestep_respacing")},
            "model_sha256": settings.get("model_sha256"), "seed": settings.get("seed"),
            "random_init": settings.get("random_init")}


def check_finished_folder(path, settings):
    """Members all present: refuse to evaluate them with other features than they were trained on, and give a
    folder of released members (which has no settings.json) one, so Interpreter.load and predict can read it."""
    if not os.path.isfile(path):
        check_writable(os.path.dirname(path))
        atomic_write_json(path, settings)
        return
    recorded = read_json_object(path, "run settings")
    saved, now = identity(recorded), identity(json.loads(json.dumps(settings)))
    if "model_sha256" not in recorded and not now["random_init"]:
        # Written before checkpoints were hashed: from now on the folder is tied to this checkpoint.
        print(f"{path} records no checkpoint hash; recording that of {settings['config']['model_path']} "
              f"({short(settings['model_sha256'])})")
        saved["model_sha256"] = now["model_sha256"]
        atomic_write_json(path, dict(recorded, model_sha256=now["model_sha256"]))
    differ = sorted(k for k in now if saved[k] != now[k])
    if differ == ["model_sha256"]:
        raise ValueError(f"{path}: the members beside it were trained on the features of a checkpoint with sha256 "
                         f"{short(saved['model_sha256'])}, but {settings['config']['model_path']} has "
                         f"{short(now['model_sha256'])}; use that checkpoint, or another --run_dir")
    if differ:
        raise ValueError(f"{path}: the members beside it were trained with other {', '.join(differ)} "
                         f"({ {k: saved[k] for k in differ} } vs now { {k: now[k] for k in differ} }); "
                         "use the settings they were made with, or another --run_dir")


def run(cfg, exp_path, model_flags, opts: TrainOptions):
    """Train what is missing, then evaluate; returns the metrics dict also written to metrics.json."""
    seed_everything(opts.seed)
    device = resolve_device(opts.device)
    autocast = resolve_autocast(opts.autocast, device)
    store_dtype = store_dtype_name(opts.store_dtype, autocast)
    folder = opts.run_dir or run_dir(cfg, opts.seed, opts.random_init)
    check_paths(cfg, ["training_path", "testing_path"] + ([] if opts.random_init else ["model_path"]), exp_path)
    # Checked before anything is extracted; its pixel share needs the map shapes (below).
    recipe = make_recipe(opts.recipe, opts.batch_size, opts.lr, opts.epochs, opts.projection_width, cfg.batch_size)

    # Everything that can fail on bad input (config, labels, feature size, an unwritable folder) happens
    # before the first write, so a corrected rerun is not refused for "other settings".
    check_writable(folder)
    extractor = create_feature_extractor(cfg, model_flags, device, seed=opts.seed, random_init=opts.random_init,
                                         config_path=exp_path, dtype=opts.extract_dtype)
    extract_dtype_name = dtype_name(extract_dtype(opts.extract_dtype, device, bool(model_flags.get("use_fp16"))))
    test_items = load_split(cfg, "test")
    todo = [m for m in range(cfg.model_num) if not os.path.exists(member_path(folder, m))]
    if opts.eval_only and todo:
        raise FileNotFoundError(f"--eval_only: {folder} lacks {[os.path.basename(member_path(folder, m)) for m in todo]}")
    settings = {"config": cfg.to_dict(), "model_flags": model_flags, "seed": opts.seed, "random_init": opts.random_init,
                "model_sha256": None if opts.random_init else path_sha256(cfg.model_path),
                "extract_dtype": extract_dtype_name}
    if not todo:
        check_finished_folder(os.path.join(folder, SETTINGS_NAME), settings)
    timings = {}
    if todo:
        train_items = load_split(cfg, "train")
        start = time.time()  # extraction time counts the first image, extracted alone to check the feature size
        first_maps = extractor(train_items[0].image)
        check_feature_size(cfg, first_maps, exp_path)
        sampler = training_sampler(cfg, train_items)  # refuses labels with fewer than 2 labelled pixels
        recipe = recipe.for_maps([m.shape for m in first_maps], sampler.image_size)
        os.makedirs(folder, exist_ok=True)
        # Members and the feature cache are only resumed with the settings, checkpoint and training data
        # that made them.
        check_settings(os.path.join(folder, SETTINGS_NAME),
                       {**settings, "training_data_sha256": data_sha256(train_items),
                        "store_dtype": store_dtype, "autocast": autocast, **recipe.settings()},
                       write=True)
        atomic_write_json(os.path.join(folder, os.path.basename(exp_path)), cfg.to_dict())
        atomic_write_json(os.path.join(folder, "model_flags.json"), model_flags)

        store_root = os.path.join(folder, "features")
        extract_batch = extract_batch_size(opts.extract_batch, memory_per_image(extractor), device)
        store = extract_training_store(extractor, train_items, first_maps, store_root, opts.store,
                                       STORE_DTYPES[store_dtype], extract_batch)
        timings["extract_train_s"] = time.time() - start
        timings["extract_batch"] = extract_batch
        print(f"{len(train_items)} training images, {len(sampler)} labelled pixels, {store.num_features} features "
              f"per pixel, store {store.nbytes / 2**30:.2f} GiB ({'disk' if store.root else 'RAM'}); "
              f"training members {todo}, recipe {recipe.name}, batch {recipe.batch_size}, lr {recipe.lr:g}")
        start = time.time()
        ensemble = MLPEnsemble(cfg.dim[-1], cfg.number_class, cfg.model_num, seed=opts.seed).to(device)
        stats, train_timings = train_members(ensemble, store, sampler, recipe, seed=opts.seed, members=todo,
                                             device=device, matmul_dtype=AUTOCAST[autocast],
                                             on_member_done=lambda m: ensemble.save_member(member_path(folder, m), m))
        timings.update(train_timings)
        timings["train_ensemble_s"] = time.time() - start
        timings["member_steps"] = {m: stats[m]["steps"] for m in todo}
        del store, ensemble  # the members are on disk; evaluation loads them from there
        shutil.rmtree(store_root, ignore_errors=True)  # a cache for resuming; the members are what we keep
    interpreter = Interpreter.build(cfg, model_flags, folder, opts.seed, opts.random_init, device,
                                    extract_batch=opts.extract_batch, extractor=extractor)
    start = time.time()
    metrics = evaluate(interpreter, test_items, folder, pictures=opts.pictures)
    timings["evaluate_s"] = time.time() - start
    metrics.update(seed=opts.seed, model_type=cfg.model_type, category=cfg.category,
                   random_init=opts.random_init, timings=timings)
    atomic_write_json(os.path.join(folder, "metrics.json"), metrics)
    print(f"mIoU {100 * metrics['miou']:.2f}  ({folder})")
    return metrics
