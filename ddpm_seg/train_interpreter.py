"""train-interpreter: config -> feature extractor -> feature store -> ensemble -> predictions, mIoU, pictures.

One run = one seed, in <exp_dir>/<steps_blocks>/seed_<seed>/. Members already saved there are kept,
so a stopped run resumes with the members it has not saved yet. The work is ddpm_seg.training.run.
"""

import argparse

import numpy as np

from .config import load_experiment, resolve_model_flags, run_dir
from .training import add_args, interrupted_note, run
from .utils import on_interrupt


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
    seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]
    if len(seeds) > 1 and args.run_dir:
        raise ValueError("--run_dir names one folder; it cannot be combined with several --seeds")
    results = {}
    for seed in seeds:
        args.seed = seed
        folder = args.run_dir or run_dir(cfg, seed, args.random_init)
        with on_interrupt(lambda: interrupted_note(cfg, folder)):
            results[seed] = run(cfg, args.exp, flags, args)["miou"]
    if len(seeds) > 1:
        values = np.array(list(results.values())) * 100
        print(f"mIoU over seeds {seeds}: {values.mean():.2f} ± {values.std(ddof=1):.2f}")
