"""train-ddpm: train a guided-diffusion DDPM on a folder of unlabelled images (ddpm_seg.ddpm_training).

Flags follow guided-diffusion's image_train.py, so checkpoints from either side load into the other. Under
torchrun (WORLD_SIZE > 1) each process trains on its own shard; --batch_size is per process.
"""

import argparse
import json
import sys

from guided_diffusion.script_util import add_dict_to_argparser

from ..ddpm_training import train_ddpm, train_ddpm_defaults


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ddpm-seg train-ddpm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(parser, train_ddpm_defaults())
    result = train_ddpm(vars(parser.parse_args(argv)))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
