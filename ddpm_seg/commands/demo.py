"""ddpm-seg demo: the whole method on a CPU in minutes, with nothing to download.

1. generate the demo "shapes" dataset (classes differ by shape and context, not by colour);
2. take the demo DDPM shipped in experiments/demo/demo_ddpm.pt, or with --retrain train it here from scratch
   with the recipe that made it (cached under checkpoints/demo/, an interrupted training resumes);
3. run train-interpreter on its features exactly as on the paper's datasets (experiments/demo/ddpm.json);
4. run the same interpreter on two baselines: raw RGB pixels, and the same UNet at random initialisation
   (and, with --backbones, MAE / SwAV at random initialisation);
5. draw the test image of median IoU with the DDPM's and the raw-pixel baseline's predictions of it.

--curve instead scores the same interpreter on the EMA checkpoints a --retrain run saved in checkpoints/demo/ at
200, 400, 800, ... steps and on its last one: mIoU against the DDPM's training steps, as a table, curve.json and
curve.png.
"""

import argparse

from ..demo import FEATURE_SIZES, DemoOptions, run_demo
from ..seeding import seed_arg


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ddpm-seg demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=DemoOptions.root, help="folder under which datasets/, checkpoints/ and "
                                                                 "pixel_classifiers/ are written (default: here)")
    parser.add_argument("--device", default=DemoOptions.device)
    parser.add_argument("--seed", type=seed_arg, default=DemoOptions.seed)
    parser.add_argument("--backbones", default="", help="also run these at random init: comma list of mae,swav,swav_w2")
    parser.add_argument("--retrain", action="store_true",
                        help="train the demo DDPM here from scratch (the shipped one's recipe) instead of using "
                             "experiments/demo/demo_ddpm.pt")
    parser.add_argument("--curve", action="store_true",
                        help="score the interpreter on the EMA checkpoints of a --retrain run at 200, 400, 800, ... "
                             "steps and the last (mIoU against training steps) instead of running the demo")
    parser.add_argument("--small", action="store_true", help="toy sizes (used by the tests)")
    args = parser.parse_args(argv)
    backbones = tuple(b for b in args.backbones.split(",") if b)
    unknown = sorted(set(backbones) - set(FEATURE_SIZES))
    if unknown:
        raise ValueError(f"--backbones: unknown {unknown}; choose from {sorted(FEATURE_SIZES)}")
    run_demo(DemoOptions(root=args.root, device=args.device, seed=args.seed, backbones=backbones,
                         retrain=args.retrain, curve=args.curve, small=args.small))
    return 0
