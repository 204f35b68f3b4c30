"""sweep: which diffusion steps and UNet decoder blocks carry the most label information.

Blocks are output-block indices for a DDPM (model_type "ddpm") and module names for a diffusers pipeline
(model_type "diffusers"), e.g. --blocks up_blocks.1,up_blocks.2.attentions.0.

One light interpreter per (step, block) cell, trained on that single activation map and scored by mIoU on the
test images; the result is a steps x blocks table, written as sweep.csv and a heat-map sweep.png.

Every forward pass of the UNet happens once: the training images are extracted once per step (all blocks of
the step in that pass) and every cell of the step trains on its own map of that extraction; each test image is
extracted once per step and scored by every cell. Each step runs as its own forward (batch of one image), the
batch a one-step train-interpreter run uses: batching several steps changes convolution results in the last
bits, and with one-step batches a cell equals `train-interpreter` with steps [t], blocks [b],
model_num = --members and the same seed exactly (share_noise experiments; without it the noise draws differ).
"""

import argparse
import os
import time

from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults

from ..backbones import backbone
from ..config import load_experiment
from ..recipe import RECIPES
from ..seeding import seed_arg
from ..sweep import SweepOptions, best_cell, format_table, run_sweep, save_heatmap, write_csv
from .flags import add_extraction_args, add_precision_args, options_from_flags, resolve_model_flags


def parse_index_list(text: str, flag: str) -> list:
    """'0-3,7,9' -> [0, 1, 2, 3, 7, 9] (ranges inclusive, order kept, no duplicates)."""
    values = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{flag}: {part!r} is not a non-negative integer or a range like 0-17 (in {text!r})")
        if sep and int(hi) < int(lo):
            raise ValueError(f"{flag}: range {part!r} runs backwards (in {text!r})")
        values += range(int(lo), int(hi) + 1) if sep else [int(lo)]
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{flag}: {repeated} listed more than once (in {text!r})")
    return values


def parse_block_list(text: str, named_blocks: bool) -> list:
    """--blocks: output-block indices (a DDPM), or comma-separated module names (named_blocks: a diffusers
    pipeline)."""
    if not named_blocks:
        return parse_index_list(text, "--blocks")
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise ValueError(f"--blocks: empty module name in {text!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--blocks: {repeated} listed more than once (in {text!r})")
    return names


def add_args(parser):
    parser.add_argument("--exp", required=True, help="experiment config of a DDPM or a diffusers pipeline, "
                                                     "e.g. experiments/demo/ddpm.json")
    parser.add_argument("--steps", default=None, help="diffusion steps, e.g. 50,150,250 (default: the config's)")
    parser.add_argument("--blocks", default=None, help="UNet output blocks, e.g. 0-17 or 5,6,8-12; module names for "
                                                       "diffusers, e.g. up_blocks.1,up_blocks.2 (default: the config's)")
    parser.add_argument("--members", type=int, default=SweepOptions.members, help="ensemble members per cell")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=SweepOptions.recipe,
                        help="how each cell's members train, as train-interpreter's --recipe (with its default batch, "
                             "epochs and projection width)")
    parser.add_argument("--max_epochs", type=int, default=SweepOptions.max_epochs,
                        help="cap on each member's epochs (default: train-interpreter's; cells then match it)")
    parser.add_argument("--seed", type=seed_arg, default=SweepOptions.seed)
    parser.add_argument("--device", default=SweepOptions.device, help="auto | cpu | cuda[:i]")
    parser.add_argument("--out", default=None, help="output folder (default <exp_dir>/sweep)")
    parser.add_argument("--store", choices=["auto", "ram", "disk"], default=SweepOptions.store,
                        help="where one step's training features live (as train-interpreter)")
    add_precision_args(parser)
    add_extraction_args(parser)
    add_dict_to_argparser(parser, model_and_diffusion_defaults())


def sweep_options(args, cfg) -> SweepOptions:
    """The flags as SweepOptions; --steps, --blocks and --out default to the config's steps and blocks and
    <exp_dir>/sweep."""
    named = backbone(cfg.model_type).named_blocks
    return options_from_flags(
        SweepOptions, args,
        steps=parse_index_list(args.steps, "--steps") if args.steps else cfg.steps,
        blocks=parse_block_list(args.blocks, named) if args.blocks else cfg.blocks,
        out=args.out or os.path.join(cfg.exp_dir, "sweep"))


def main(argv):
    parser = argparse.ArgumentParser(prog="ddpm-seg sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    args = parser.parse_args(argv)
    if args.members < 1:
        raise ValueError(f"--members must be >= 1, got {args.members}")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ValueError(f"--max_epochs must be >= 1, got {args.max_epochs}")
    cfg = load_experiment(args.exp)
    opts = sweep_options(args, cfg)
    flags = resolve_model_flags(cfg, args, argv)

    start = time.time()
    cells = run_sweep(cfg, args.exp, flags, opts)
    elapsed = time.time() - start
    csv_path, png_path = os.path.join(opts.out, "sweep.csv"), os.path.join(opts.out, "sweep.png")
    write_csv(csv_path, cells)
    save_heatmap(png_path, cells, opts.steps, opts.blocks)
    print(format_table(cells, opts.steps, opts.blocks))
    best = best_cell(cells)
    print(f"best: step {best['step']}, block {best['block']} ({best['channels']} channels at "
          f"{best['resolution'][0]}x{best['resolution'][1]}): mIoU {100 * best['miou']:.2f}")
    print(f"{len(cells)} cells in {elapsed:.0f} s; wrote {csv_path} and {png_path}")
