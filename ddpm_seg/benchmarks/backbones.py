"""The backbones phase: extraction time per image of experiment configs' backbones at their paper size.

Each config's backbone is built at random initialisation (random weights cost the same FLOPs as the released
ones, and nothing is downloaded), once per --dtypes entry (train-interpreter's --extract_dtype), and timed one
image per call on random images at the config's resolution: --warmup untimed images, then --images timed ones,
in this process on --threads threads. A GAN Inversion config projects for --inversion_steps steps instead of its
own (1000 in the shipped configs): its row gives the seconds per step and the time of the config's own steps
at that rate. Its LPIPS weights, when it asks for LPIPS, are random ones written to a temporary folder.
"""

import os
import statistics
import tempfile

import numpy as np
import torch

from ..backbones import create_feature_extractor
from ..config import load_experiment
from ..lpips import LPIPS
from .harness import time_extraction

DEFAULT_CONFIGS = ("experiments/bedroom_28/alae.json", "experiments/ffhq_34/alae.json",
                   "experiments/ffhq_34/vdvae.json", "experiments/horse_21/gan_encoder.json",
                   "experiments/ffhq_34/gan_encoder.json", "experiments/horse_21/gan_inversion.json",
                   "experiments/bedroom_28/dinov2.json")
EXTRACT_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}  # --dtypes name -> --extract_dtype name


def random_lpips_files(folder: str) -> dict:
    """Random LPIPS weights in the two release formats: the config keys that name them."""
    lpips = LPIPS()
    paths = {"perceptual_vgg16_path": os.path.join(folder, "vgg16.pth"),
             "perceptual_lpips_path": os.path.join(folder, "lpips.pth")}
    torch.save({f"features.{k}": v for k, v in lpips.features.state_dict().items()}, paths["perceptual_vgg16_path"])
    torch.save({k: v for k, v in lpips.state_dict().items() if k.startswith("lin")}, paths["perceptual_lpips_path"])
    return paths


def timed_config(path: str, opts, folder: str) -> list:
    """A row per dtype: seconds per image of the config's backbone (and, for GAN Inversion, per step)."""
    cfg = load_experiment(path)
    config_steps = None
    if cfg.model_type == "gan_inversion":
        config_steps = cfg.backbone_options.get("inversion_steps", 1000)
        changes = {"inversion_steps": opts.inversion_steps}
        if cfg.backbone_options.get("perceptual_loss", "lpips") == "lpips":
            changes.update(random_lpips_files(folder))
        cfg = cfg.replace(**changes)
    height, width = cfg.dim[:2]
    images = np.random.default_rng(opts.seed).integers(0, 256, (opts.warmup + opts.images, height, width, 3),
                                                       dtype=np.uint8)
    rows = []
    for dtype_name in opts.dtypes:
        extractor = create_feature_extractor(cfg, {}, torch.device("cpu"), seed=opts.seed, random_init=True,
                                             dtype=EXTRACT_DTYPES[dtype_name])
        features = []  # per call: the maps' channels, which a random-weight model need not match dim[-1] with

        def extract(image):
            maps = extractor(image)
            features.append(sum(m.shape[0] for m in maps))
            return maps

        times = time_extraction(extract, images, opts.warmup)
        row = {"config": path, "model_type": cfg.model_type, "dtype": dtype_name, "features": features[-1],
               "times_s": times, "median_s": statistics.median(times)}
        if config_steps is not None:
            row.update(inversion_steps=opts.inversion_steps, step_s=row["median_s"] / opts.inversion_steps,
                       config_steps=config_steps)
            row["config_steps_s"] = row["step_s"] * config_steps
        rows.append(row)
    return rows


def format_row(r) -> str:
    line = f"{r['config']:42s} {r['dtype']:9s} {r['features']:6d} {r['median_s']:8.2f} s"
    if "step_s" in r:
        line += (f"  ({r['inversion_steps']} projector steps: {r['step_s']:.2f} s per step, "
                 f"{r['config_steps_s'] / 60:.0f} min for the config's {r['config_steps']})")
    return line


def measure(opts, say):
    """Every config of --configs in this process on --threads threads (restored afterwards): a row per dtype."""
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            for path in opts.configs:
                for row in timed_config(path, opts, folder):
                    rows.append(row)
                    say("  " + format_row(row))
    finally:
        torch.set_num_threads(threads)
    print(f"\nseconds per image (median of {opts.images}), paper-size backbones at random weights, "
          f"{opts.threads} threads:")
    print(f"{'config':42s} {'dtype':9s} {'feat.':>6s} {'time':>10s}")
    for r in rows:
        print(format_row(r))
    return {"threads": opts.threads, "results": rows}
