"""ddpm-seg demo: the whole method on a CPU in minutes, with nothing to download.

1. generate the demo "shapes" dataset (classes differ by shape and context, not by colour);
2. train a small DDPM on its unlabelled pool (cached under checkpoints/demo/, resumable);
3. run train-interpreter on its features exactly as on the paper's datasets (experiments/demo/ddpm.json);
4. run the same interpreter on two baselines: raw RGB pixels, and the same UNet at random initialisation
   (and, with --backbones, MAE / SwAV at random initialisation).
"""

import argparse
import json
import os
import shutil
import time

from guided_diffusion.script_util import model_and_diffusion_defaults

from .config import load_experiment, run_dir
from .demo_data import generate_demo_dataset
from .train_ddpm import train_ddpm, train_ddpm_defaults
from .training import add_args as add_interpreter_args
from .training import run as run_interpreter
from .utils import atomic_path, atomic_write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_EXPERIMENT = os.path.join(REPO, "experiments", "demo", "ddpm.json")
# Measured on 2 CPU cores: ~3 minutes of DDPM training (bf16 autocast) gives features well past raw pixels.
DDPM_TRAINING = dict(batch_size=32, lr=5e-4, max_steps=800, precision="bf16", ema_rate="0.995", num_workers=0,
                     save_interval=200, log_interval=50)
DATASET = dict(num_pool=4000, num_train=20, num_test=50)
# --small: the same pipeline at toy sizes, for the test suite.
SMALL_DDPM_TRAINING = dict(DDPM_TRAINING, max_steps=120, save_interval=60)
SMALL_DATASET = dict(num_pool=256, num_train=6, num_test=6)
FEATURE_SIZES = {"mae": 12288, "swav": 6720, "swav_w2": 13440}


def ensure_ddpm(cfg, flags, training, data_dir, seed, device):
    """Train the demo DDPM unless its final checkpoint exists; an interrupted training resumes."""
    model_path = cfg["model_path"]
    if os.path.isfile(model_path):
        print(f"using the cached demo DDPM {model_path}")
        return
    out_dir = os.path.dirname(model_path)
    # train-ddpm resumes from the last complete checkpoint set in out_dir by itself.
    opts = {**train_ddpm_defaults(), **flags, **training, "data_dir": data_dir, "out_dir": out_dir, "seed": seed,
            "device": device}
    print(f"training the demo DDPM ({training['max_steps']} steps) on {data_dir} -> {out_dir}")
    result = train_ddpm(opts)
    # The final EMA under a fixed name (beside model_flags.json) is what the experiment config points at.
    with atomic_path(model_path) as tmp:
        shutil.copyfile(next(iter(result["ema"].values())), tmp)


def baseline_configs(cfg, backbones):
    """The same experiment on other features: raw pixels, and each extra backbone at random initialisation."""
    root = os.path.dirname(cfg["exp_dir"])
    configs = {"pixels": dict(cfg, model_type="pixels", dim=cfg["dim"][:2] + [3], steps=[], blocks=[],
                              exp_dir=os.path.join(root, "pixels"))}
    for name in backbones:
        configs[name] = dict(cfg, model_type=name, dim=cfg["dim"][:2] + [FEATURE_SIZES[name]], steps=[], blocks=[],
                             input_activations=name != "mae", exp_dir=os.path.join(root, name))
    return configs


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ddpm-seg demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="folder under which datasets/, checkpoints/ and "
                                                     "pixel_classifiers/ are written (default: here)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbones", default="", help="also run these at random init: comma list of mae,swav,swav_w2")
    parser.add_argument("--small", action="store_true", help="toy sizes (used by the tests)")
    args = parser.parse_args(argv)
    backbones = [b for b in args.backbones.split(",") if b]
    unknown = sorted(set(backbones) - set(FEATURE_SIZES))
    if unknown:
        raise ValueError(f"--backbones: unknown {unknown}; choose from {sorted(FEATURE_SIZES)}")

    start = time.time()
    cfg = load_experiment(DEMO_EXPERIMENT)
    with open(os.path.join(os.path.dirname(DEMO_EXPERIMENT), "model_flags.json")) as f:
        flags = {**model_and_diffusion_defaults(), **json.load(f)}
    # The config's relative paths are taken under --root, so the demo can run anywhere.
    for key in ("exp_dir", "training_path", "testing_path", "model_path"):
        cfg[key] = os.path.join(args.root, cfg[key])
    if args.small:
        cfg.update(model_num=3, training_number=SMALL_DATASET["num_train"], testing_number=SMALL_DATASET["num_test"])
    dataset = SMALL_DATASET if args.small else DATASET
    paths = generate_demo_dataset(os.path.dirname(os.path.dirname(cfg["training_path"])),
                                  image_size=cfg["dim"][0], seed=args.seed, **dataset)
    ensure_ddpm(cfg, flags, SMALL_DDPM_TRAINING if args.small else DDPM_TRAINING, paths["unlabelled"], args.seed,
                args.device)
    ddpm_done = time.time()

    # train-interpreter's own defaults, so the demo runs it exactly as the command line would.
    interpreter_parser = argparse.ArgumentParser()
    add_interpreter_args(interpreter_parser)
    interpreter_args = interpreter_parser.parse_args(
        ["--exp", DEMO_EXPERIMENT, "--seed", str(args.seed), "--device", args.device, "--store", "ram"])
    runs = {"DDPM (trained here)": (cfg, False)}
    runs["DDPM at random init"] = (cfg, True)
    for name, baseline in baseline_configs(cfg, backbones).items():
        runs["raw RGB pixels" if name == "pixels" else f"{name} at random init"] = (baseline, name != "pixels")
    results = {}
    for title, (run_cfg, random_init) in runs.items():
        print(f"\n=== {title} ===")
        interpreter_args.random_init = random_init
        metrics = run_interpreter(run_cfg, DEMO_EXPERIMENT, flags, interpreter_args)
        results[title] = {"miou": metrics["miou"], "run_dir": run_dir(run_cfg, args.seed, random_init)}

    summary = {"results": results, "ddpm_s": ddpm_done - start, "total_s": time.time() - start}
    atomic_write_json(os.path.join(os.path.dirname(cfg["exp_dir"]), "demo_summary.json"), summary)
    print("\n features               mIoU %")
    for title, r in results.items():
        print(f" {title:<22} {100 * r['miou']:6.2f}")
    print(f"\ndata + DDPM: {summary['ddpm_s']:.0f} s, total: {summary['total_s']:.0f} s; pictures in "
          f"{os.path.join(results['DDPM (trained here)']['run_dir'], 'predictions')}")
    return 0
