"""generate-dataset: sample images from the DDPM and label them with a trained ensemble (DatasetDDPM).

Each sample is labelled exactly as train-interpreter labels a real image: its uint8 pixels go through
the experiment's feature extractor (same steps, blocks and shared noise seed) and the ensemble's
majority vote; the image's uncertainty score is kept for filtering. The result has the original's
layout, <out_dir>/samples_<H>x<W>x3.npz with
    arr_0  uint8   [N, H, W, 3]  images
    arr_1  uint8   [N, H, W]     labels
    arr_2  float32 [N]           uncertainty scores (mean of the top 10% pixel uncertainties)

Samples are made in chunks of --batch_size consecutive indices, and each finished chunk is written
to <out_dir>/samples_<H>x<W>x3_shards/chunk_<k>.npz beside an index.json of the settings: a stopped
run resumes with the chunks it lacks, and one started with other settings is refused. The shards are
merged into the final file at the end; a later run with a larger --num_samples adds the missing samples
to it. A lock file in the shards folder (holding the owner's pid) refuses a second run into the same
folder at once; a lock whose process is gone is taken over.

Reproducibility: sample i draws its starting noise and every ancestral step's noise from its own
generator seeded with (sample_seed, i), and a chunk is the same batch whatever the number of
processes, so the final file does not depend on how many workers made it (on one device type, with
the same --batch_size). Under torchrun (WORLD_SIZE > 1) process r makes the chunks k with
k % world_size == r (nccl on CUDA, gloo on CPU) and rank 0 merges them once all are on disk.
"""

import argparse
import sys

from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults

from ..config import load_experiment
from ..seeding import seed_arg
from ..synthetic_data import GenerateOptions, generate_dataset, sampling_options
from .flags import add_extraction_args, options_from_flags, resolve_model_flags


def add_args(parser):
    parser.add_argument("--exp", required=True, help="experiment config, e.g. experiments/bedroom_28/datasetDDPM.json")
    parser.add_argument("--seed", type=seed_arg, default=GenerateOptions.seed,
                        help="seed of the trained ensemble run (its folder and its shared feature noise)")
    parser.add_argument("--run_dir", default=GenerateOptions.run_dir,
                        help="the ensemble's folder (default <exp_dir>/<suffix>/seed_<seed>)")
    parser.add_argument("--out_dir", default=GenerateOptions.out_dir,
                        help="where the .npz goes (default: the ensemble's folder)")
    parser.add_argument("--device", default=GenerateOptions.device,
                        help="auto | cpu | cuda[:i] (under torchrun: cuda:LOCAL_RANK)")
    add_dict_to_argparser(parser, sampling_options(GenerateOptions))
    # --extract_dtype also sets the dtype the samples are drawn in: both run the same UNet.
    add_extraction_args(parser)
    # Model flags, as train-interpreter takes them. --timestep_respacing (e.g. 250, or ddim100 with --use_ddim True)
    # shortens sampling only: features are always taken on the full process the ensemble was trained with.
    add_dict_to_argparser(parser, model_and_diffusion_defaults())


def main(argv):
    parser = argparse.ArgumentParser(prog="ddpm-seg generate-dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    args = parser.parse_args(argv)
    cfg = load_experiment(args.exp)
    generate_dataset(cfg, args.exp, resolve_model_flags(cfg, args, argv), options_from_flags(GenerateOptions, args))


if __name__ == "__main__":
    main(sys.argv[1:])
