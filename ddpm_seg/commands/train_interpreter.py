"""train-interpreter: config -> feature extractor -> feature store -> ensemble -> predictions, mIoU, pictures.

One run = one seed, in <exp_dir>/<steps_blocks>/seed_<seed>/. Members already saved there are kept,
so a stopped run resumes with the members it has not saved yet. The work is ddpm_seg.training.run.
"""

import argparse
import dataclasses

import numpy as np

from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults

from ..config import load_experiment, run_dir
from ..progress import on_interrupt
from ..recipe import PROJECTION_WIDTH, RECIPES
from ..seeding import seed_arg
from ..training import TrainOptions, interrupted_note, run
from .flags import add_extraction_args, add_precision_args, options_from_flags, resolve_model_flags


def add_args(parser):
    parser.add_argument("--exp", required=True, help="experiment config, e.g. experiments/bedroom_28/ddpm.json")
    parser.add_argument("--seed", type=seed_arg, default=TrainOptions.seed)
    parser.add_argument("--seeds", default=None, help="comma list of seeds, each an independent run in its own folder")
    parser.add_argument("--eval_only", action="store_true",
                        help="evaluate an existing ensemble (e.g. the released pixel classifiers, with --run_dir) "
                             "without training")
    parser.add_argument("--device", default=TrainOptions.device, help="auto | cpu | cuda[:i]")
    parser.add_argument("--store", choices=["auto", "ram", "disk"], default=TrainOptions.store,
                        help="where training features live: RAM, memory-mapped files in the run folder, or "
                             "RAM when they take less than half the available memory")
    add_precision_args(parser)
    add_extraction_args(parser)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=TrainOptions.recipe,
                        help="fast: batch 1024, --epochs epochs, the members trained on a fixed projection of the "
                             f"features to {PROJECTION_WIDTH} principal directions per resolution (folded back into "
                             "members of the original format), each epoch a random share of the labelled pixels as "
                             "large as the finest feature map's share of the image; paper: the original recipe (the "
                             "config's batch size, every pixel in every epoch, all features, the original stopping "
                             "rule)")
    parser.add_argument("--epochs", type=int, default=TrainOptions.epochs,
                        help="--recipe fast: every member trains this many epochs and 51 steps, the shortest run the "
                             "paper's stopping rule allows (0: that rule, which stops each member by its batch losses)")
    parser.add_argument("--projection_width", type=int, default=TrainOptions.projection_width,
                        help="--recipe fast: principal directions kept per resolution table (0: no projection)")
    parser.add_argument("--batch_size", type=int, default=TrainOptions.batch_size,
                        help="pixels per member per step (default: 1024 under --recipe fast, the config's (64 in "
                             "the paper's) under --recipe paper)")
    parser.add_argument("--lr", type=float, default=TrainOptions.lr,
                        help="Adam learning rate (default: 1e-3 * sqrt(batch_size / 64), the paper's 1e-3 at 64)")
    parser.add_argument("--random_init", action="store_true",
                        help="use the backbone at random initialisation instead of model_path (a baseline)")
    parser.add_argument("--run_dir", default=TrainOptions.run_dir,
                        help="override the run folder (default <exp_dir>/<suffix>/seed_<seed>)")
    parser.add_argument("--no_pictures", action="store_true", help="skip the per-image PNGs")
    add_dict_to_argparser(parser, model_and_diffusion_defaults())


def parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = [-1]
    if min(seeds) < 0:
        raise ValueError(f"--seeds must be a comma list of integers >= 0 like 0,1,2, got {text!r}")
    return seeds


def main(argv):
    # No abbreviated flags: explicit_flags() must see exactly which model flags were typed.
    parser = argparse.ArgumentParser(prog="ddpm-seg train-interpreter", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    args = parser.parse_args(argv)
    cfg = load_experiment(args.exp)
    flags = resolve_model_flags(cfg, args, argv)
    opts = options_from_flags(TrainOptions, args, pictures=not args.no_pictures)
    seeds = parse_seeds(args.seeds) if args.seeds else [opts.seed]
    if len(seeds) > 1 and opts.run_dir:
        raise ValueError("--run_dir names one folder; it cannot be combined with several --seeds")
    results = {}
    for seed in seeds:
        folder = opts.run_dir or run_dir(cfg, seed, opts.random_init)
        with on_interrupt(lambda: interrupted_note(cfg, folder)):
            results[seed] = run(cfg, args.exp, flags, dataclasses.replace(opts, seed=seed))["miou"]
    if len(seeds) > 1:
        values = np.array(list(results.values())) * 100
        print(f"mIoU over seeds {seeds}: {values.mean():.2f} ± {values.std(ddof=1):.2f}")
