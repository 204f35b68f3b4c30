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
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults

from ..backbones import (add_extraction_args, backbone, create_feature_extractor, dtype_name, extract_batch_size,
                        extract_dtype, memory_per_image)
from ..config import check_paths, load_experiment, resolve_model_flags
from ..data import load_split
from ..ensemble import MLPEnsemble
from ..evaluate import ConfusionMatrix
from ..feature_store import FeatureStore
from ..fingerprint import data_sha256, path_sha256
from ..interpreter import segment_maps
from ..recipe import RECIPES, make_recipe, train_members
from ..training import (AUTOCAST, STORE_DTYPES, extract_training_store, resolve_autocast, store_dtype_name,
                       training_sampler)
from ..utils import atomic_path, check_settings, check_writable, progress_bar, resolve_device, seed_arg, seed_everything
from ..visualize import heatmap
from .flags import add_precision_args

CSV_COLUMNS = ("step", "block", "channels", "resolution", "miou")
# Heat-map layout in pixels: a title line, a header row of block labels, a left column of step labels.
CELL_W, CELL_H = 48, 24
LEFT, TITLE_H, HEADER_H = 72, 18, 18
BACKGROUND, INK, GRID = (255, 255, 255), (0, 0, 0), (160, 160, 160)


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


def single_map_store(store, k):
    """A RAM FeatureStore holding only map k of `store`: the store train-interpreter builds for that one map."""
    sub = FeatureStore([store.map_shapes[k]], store.image_size, store.num_images, dtype=store.dtype)
    for i in range(store.num_images):
        sub.put(i, [store.maps(i)[k]])
    return sub


def run_sweep(cfg, exp_path, model_flags, args):
    """Train and score one interpreter per (step, block) of the lists args.steps x args.blocks.

    args carries the sweep flags (steps, blocks, members, max_epochs, seed, device, out, store, store_dtype,
    autocast). Returns one dict per cell, step-major: step, block, channels, resolution (h, w), miou.
    """
    if not backbone(cfg["model_type"]).noised:
        raise ValueError(f"{exp_path}: a sweep runs over diffusion steps and blocks (a diffusion backbone such as "
                         f"model_type 'ddpm' or 'diffusers'); model_type is {cfg['model_type']!r}")
    seed_everything(args.seed)
    device = resolve_device(args.device)
    args.autocast = resolve_autocast(args.autocast, device)
    check_paths(cfg, ["training_path", "testing_path", "model_path"], exp_path)
    steps, blocks = args.steps, args.blocks
    # Built with every step and block so that out-of-range ones fail here, before anything is written.
    base = create_feature_extractor(dict(cfg, steps=steps, blocks=blocks), model_flags, device, seed=args.seed,
                                    dtype=args.extract_dtype)
    # A sweep scores its cells in view 0 (the training features' noise).
    extractors = {t: base.at_steps([t]) for t in steps}
    train_items, test_items = load_split(cfg, "train"), load_split(cfg, "test")
    sampler = training_sampler(cfg, train_items)
    limits = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    recipe = make_recipe(args.recipe, config_batch=cfg["batch_size"])

    # A disk feature cache left by an interrupted sweep is only reused for the same model, data and blocks
    # (the checkpoint and the training images compared by content).
    check_writable(args.out)
    os.makedirs(os.path.join(args.out, "features"), exist_ok=True)
    check_settings(os.path.join(args.out, "features", "settings.json"),
                   {"config": cfg, "model_flags": model_flags, "steps": steps, "blocks": blocks,
                    "seed": args.seed, "store_dtype": store_dtype_name(args.store_dtype, args.autocast),
                    "model_sha256": path_sha256(cfg.get("model_path")),
                    "training_data_sha256": data_sha256(train_items),
                    "extract_dtype": dtype_name(extract_dtype(args.extract_dtype, device,
                                                              bool(model_flags.get("use_fp16"))))}, write=True)

    # Steps one after the other, so only one step's training features are held at a time.
    cells, ensembles = [], {}
    bar = progress_bar(total=len(steps) * len(blocks), desc="sweep cells")
    for t in steps:
        store_root = os.path.join(args.out, "features", f"step_{t}")
        first_maps = extractors[t](train_items[0].image)
        batch = extract_batch_size(args.extract_batch, memory_per_image(extractors[t]), device)
        store = extract_training_store(extractors[t], train_items, first_maps, store_root, args.store,
                                       STORE_DTYPES[store_dtype_name(args.store_dtype, args.autocast)], batch)
        for k, b in enumerate(blocks):
            channels, h, w = store.map_shapes[k]
            cell_store = single_map_store(store, k)
            ensemble = MLPEnsemble(channels, cfg["number_class"], args.members, seed=args.seed).to(device)
            cell_recipe = recipe.for_maps([(channels, h, w)], store.image_size)
            train_members(ensemble, cell_store, sampler, cell_recipe, seed=args.seed, device=device,
                          matmul_dtype=AUTOCAST[args.autocast], progress=False, **limits)
            ensembles[t, b] = ensemble
            cells.append({"step": t, "block": b, "channels": channels, "resolution": (h, w)})
            bar.update(1)
        del store
        shutil.rmtree(store_root, ignore_errors=True)
    bar.close()

    matrices = {key: ConfusionMatrix(cfg["number_class"], cfg["ignore_label"]) for key in ensembles}
    bar = progress_bar(total=len(test_items), desc="evaluate cells")
    # Extractors that do not estimate their memory per image (None) get the default batch.
    sizes = [memory_per_image(e) for e in extractors.values()]
    batch = extract_batch_size(args.extract_batch, None if None in sizes else max(sizes), device)
    for start in range(0, len(test_items), batch):
        chunk = test_items[start:start + batch]
        images = np.stack([item.image for item in chunk])
        for t in steps:
            maps = extractors[t](images)
            for j, item in enumerate(chunk):
                for k, b in enumerate(blocks):
                    labels, _, _ = segment_maps(ensembles[t, b], [maps[k][j]], item.label.shape, item.label.shape)
                    matrices[t, b].update(labels, item.label)
        bar.update(len(chunk))
    bar.close()
    for cell in cells:
        cell["miou"] = matrices[cell["step"], cell["block"]].miou()
    shutil.rmtree(os.path.join(args.out, "features"), ignore_errors=True)
    return cells


def miou_grid(cells, steps, blocks) -> np.ndarray:
    """mIoU [len(steps), len(blocks)] from the cell dicts."""
    by_key = {(c["step"], c["block"]): c["miou"] for c in cells}
    return np.array([[by_key[t, b] for b in blocks] for t in steps])


def format_table(cells, steps, blocks) -> str:
    grid = 100 * miou_grid(cells, steps, blocks)
    labels = [f"b{b}" if isinstance(b, int) else b for b in blocks]
    widths = [max(8, len(label) + 2) for label in labels]
    lines = ["mIoU %  " + "".join(f"{label:>{w}}" for label, w in zip(labels, widths))]
    lines += [f"{'t=' + str(t):<8}" + "".join(f"{v:{w}.2f}" for v, w in zip(row, widths)) for t, row in zip(steps, grid)]
    return "\n".join(lines)


def best_cell(cells):
    return max(cells, key=lambda c: c["miou"])


def write_csv(path, cells) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(",".join(CSV_COLUMNS) + "\n")
            for c in cells:
                h, w = c["resolution"]
                # repr round-trips the float, so the file holds the exact mIoU.
                f.write(f"{c['step']},{c['block']},{c['channels']},{h}x{w},{c['miou']!r}\n")


def cell_origin(i, j, cell_w=CELL_W):
    """Top-left pixel of the heat-map cell of step row i, block column j."""
    return LEFT + j * cell_w, TITLE_H + HEADER_H + i * CELL_H


def _centred(draw, box, text, font, fill):
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x0, y0, x1, y1 = box
    draw.text((x0 + (x1 - x0 - (right - left)) // 2 - left, y0 + (y1 - y0 - (bottom - top)) // 2 - top),
              text, fill=fill, font=font)


def heatmap_picture(cells, steps, blocks) -> Image.Image:
    """Steps as rows, blocks as columns; each cell coloured by its mIoU and labelled with it in %."""
    grid = miou_grid(cells, steps, blocks)
    # Stretched from the worst cell (black) to the best (white): the differences are what the sweep is for,
    # and every cell carries its number anyway.
    colours = heatmap(grid - grid.min())
    font = ImageFont.load_default()
    title = f"mIoU % per diffusion step (rows) and UNet block (columns); black {100 * grid.min():.1f} -> " \
            f"white {100 * grid.max():.1f}"
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_w = probe.textbbox((0, 0), title, font=font)[2] + 8
    # Columns widen to fit module names (diffusers blocks); DDPM block indices keep CELL_W.
    cell_w = max([CELL_W] + [probe.textbbox((0, 0), str(b), font=font)[2] + 8 for b in blocks])
    width = max(LEFT + len(blocks) * cell_w, title_w)
    canvas = Image.new("RGB", (width, TITLE_H + HEADER_H + len(steps) * CELL_H), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill=INK, font=font)
    _centred(draw, (0, TITLE_H, LEFT, TITLE_H + HEADER_H), "step \\ block", font, INK)
    for j, b in enumerate(blocks):
        x, _ = cell_origin(0, j, cell_w)
        _centred(draw, (x, TITLE_H, x + cell_w, TITLE_H + HEADER_H), str(b), font, INK)
    for i, t in enumerate(steps):
        _, y = cell_origin(i, 0)
        _centred(draw, (0, y, LEFT, y + CELL_H), f"t={t}", font, INK)
        for j in range(len(blocks)):
            x, y = cell_origin(i, j, cell_w)
            colour = tuple(int(v) for v in colours[i, j])
            draw.rectangle((x, y, x + cell_w - 1, y + CELL_H - 1), fill=colour, outline=GRID)
            # Dark text on the bright end of the ramp, light text on the dark end.
            luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
            _centred(draw, (x, y, x + cell_w, y + CELL_H), f"{100 * grid[i, j]:.1f}", font,
                     INK if luminance > 128 else BACKGROUND)
    return canvas


def save_heatmap(path, cells, steps, blocks) -> None:
    with atomic_path(path) as tmp:
        heatmap_picture(cells, steps, blocks).save(tmp, format="PNG")


def add_args(parser):
    parser.add_argument("--exp", required=True, help="experiment config of a DDPM or a diffusers pipeline, "
                                                     "e.g. experiments/demo/ddpm.json")
    parser.add_argument("--steps", default=None, help="diffusion steps, e.g. 50,150,250 (default: the config's)")
    parser.add_argument("--blocks", default=None, help="UNet output blocks, e.g. 0-17 or 5,6,8-12; module names for "
                                                       "diffusers, e.g. up_blocks.1,up_blocks.2 (default: the config's)")
    parser.add_argument("--members", type=int, default=1, help="ensemble members per cell")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="fast",
                        help="how each cell's members train, as train-interpreter's --recipe (with its default batch, "
                             "epochs and projection width)")
    parser.add_argument("--max_epochs", type=int, default=None,
                        help="cap on each member's epochs (default: train-interpreter's; cells then match it)")
    parser.add_argument("--seed", type=seed_arg, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument("--out", default=None, help="output folder (default <exp_dir>/sweep)")
    parser.add_argument("--store", choices=["auto", "ram", "disk"], default="auto",
                        help="where one step's training features live (as train-interpreter)")
    add_precision_args(parser)
    add_extraction_args(parser)
    add_dict_to_argparser(parser, model_and_diffusion_defaults())


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
    args.steps = parse_index_list(args.steps, "--steps") if args.steps else cfg["steps"]
    named = backbone(cfg["model_type"]).named_blocks
    args.blocks = parse_block_list(args.blocks, named) if args.blocks else cfg["blocks"]
    args.out = args.out or os.path.join(cfg["exp_dir"], "sweep")
    flags = resolve_model_flags(cfg, args, argv)

    start = time.time()
    cells = run_sweep(cfg, args.exp, flags, args)
    elapsed = time.time() - start
    csv_path, png_path = os.path.join(args.out, "sweep.csv"), os.path.join(args.out, "sweep.png")
    write_csv(csv_path, cells)
    save_heatmap(png_path, cells, args.steps, args.blocks)
    print(format_table(cells, args.steps, args.blocks))
    best = best_cell(cells)
    print(f"best: step {best['step']}, block {best['block']} ({best['channels']} channels at "
          f"{best['resolution'][0]}x{best['resolution'][1]}): mIoU {100 * best['miou']:.2f}")
    print(f"{len(cells)} cells in {elapsed:.0f} s; wrote {csv_path} and {png_path}")
