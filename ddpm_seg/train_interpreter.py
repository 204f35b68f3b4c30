"""train-interpreter: config -> feature extractor -> feature store -> ensemble -> predictions, mIoU, pictures.

One run = one seed, in <exp_dir>/<steps_blocks>/seed_<seed>/. Members already saved there are kept,
so a stopped run resumes with the members it has not saved yet. The work is ddpm_seg.training.run.
"""

import argparse

import numpy as np

from .config import load_experiment, resolve_model_flags
from .training import add_args, run


def main(argv):
    # No abbreviated flags: explicit_flags() must see exactly which model flags were typed.
    parser = argparse.ArgumentParser(prog="ddpm-seg train-interpreter", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    args = parser.parse_args(argv)
    cfg = load_experiment(args.exp)
    flags = resolve_model_flags(cfg, args, argv)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    if len(seeds) > 1 and args.run_dir:
        raise ValueError("--run_dir names one folder; it cannot be combined with several --seeds")
    results = {}
    for seed in seeds:
        args.seed = seed
        results[seed] = run(cfg, args.exp, flags, args)["miou"]
    if len(seeds) > 1:
        values = np.array(list(results.values())) * 100
        print(f"mIoU over seeds {seeds}: {values.mean():.2f} ± {values.std(ddof=1):.2f}")
