"""The (step, block) sweep: one light interpreter per diffusion step and UNet decoder block, trained on that
single activation map and scored by mIoU on the test images; the steps x blocks table as CSV, text and a
heat-map picture. `ddpm-seg sweep` runs it.

Every forward pass of the UNet happens once: the training images are extracted once per step (all blocks of
the step in that pass) and every cell of the step trains on its own map of that extraction; each test image is
extracted once per step and scored by every cell.
"""

import os
import shutil
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .backbones import (backbone, create_feature_extractor, dtype_name, extract_batch_size, extract_dtype,
                        memory_per_image)
from .config import check_paths
from .data import load_split
from .device import resolve_device
from .ensemble import MLPEnsemble
from .evaluate import ConfusionMatrix
from .feature_store import FeatureStore
from .files import atomic_path, check_settings, check_writable
from .fingerprint import data_sha256, path_sha256
from .interpreter import segment_maps
from .progress import progress_bar
from .recipe import make_recipe, train_members
from .seeding import seed_everything
from .training import (AUTOCAST, STORE_DTYPES, TrainOptions, extract_training_store, resolve_autocast,
                       store_dtype_name, training_sampler)
from .visualize import heatmap

CSV_COLUMNS = ("step", "block", "channels", "resolution", "miou")
# Heat-map layout in pixels: a title line, a header row of block labels, a left column of step labels.
CELL_W, CELL_H = 48, 24
LEFT, TITLE_H, HEADER_H = 72, 18, 18
BACKGROUND, INK, GRID = (255, 255, 255), (0, 0, 0), (160, 160, 160)


@dataclass(frozen=True)
class SweepOptions:
    """What a sweep trains and scores: the sweep's flags, typed, with their defaults (the lists and the folder
    resolved: the command fills them from the config when their flags are not given)."""
    steps: list  # diffusion steps, the table's rows
    blocks: list  # output-block indices (a DDPM) or module names (a diffusers pipeline), the table's columns
    out: str  # output folder; a step's training features are cached in <out>/features while it trains
    members: int = 1  # ensemble members per cell
    max_epochs: Optional[int] = None  # cap on each member's epochs (None: the recipe's, as train-interpreter)
    seed: int = 0  # the noise's, the members' and their pixel streams' seed
    device: str = "auto"  # auto | cpu | cuda[:i]
    store: str = TrainOptions.store  # where one step's training features live, as TrainOptions.store
    store_dtype: str = TrainOptions.store_dtype  # as TrainOptions.store_dtype
    autocast: str = TrainOptions.autocast  # as TrainOptions.autocast
    extract_dtype: str = TrainOptions.extract_dtype  # as TrainOptions.extract_dtype
    extract_batch: Optional[int] = TrainOptions.extract_batch  # as TrainOptions.extract_batch
    recipe: str = TrainOptions.recipe  # a RECIPES name, with train-interpreter's default batch, epochs, width


def single_map_store(store, k):
    """A RAM FeatureStore holding only map k of `store`: the store train-interpreter builds for that one map."""
    sub = FeatureStore([store.map_shapes[k]], store.image_size, store.num_images, dtype=store.dtype)
    for i in range(store.num_images):
        sub.put(i, [store.maps(i)[k]])
    return sub


def run_sweep(cfg, exp_path, model_flags, opts: SweepOptions):
    """Train and score one interpreter per (step, block) of the lists opts.steps x opts.blocks.

    Returns one dict per cell, step-major: step, block, channels, resolution (h, w), miou.
    """
    if not backbone(cfg.model_type).noised:
        raise ValueError(f"{exp_path}: a sweep runs over diffusion steps and blocks (a diffusion backbone such as "
                         f"model_type 'ddpm' or 'diffusers'); model_type is {cfg.model_type!r}")
    seed_everything(opts.seed)
    device = resolve_device(opts.device)
    autocast = resolve_autocast(opts.autocast, device)
    check_paths(cfg, ["training_path", "testing_path", "model_path"], exp_path)
    steps, blocks = opts.steps, opts.blocks
    # Built with every step and block so that out-of-range ones fail here, before anything is written; the
    # lists keep the order given, which the cells' maps follow.
    base = create_feature_extractor(replace(cfg, steps=steps, blocks=blocks), model_flags, device, seed=opts.seed,
                                    dtype=opts.extract_dtype)
    # A sweep scores its cells in view 0 (the training features' noise).
    extractors = {t: base.at_steps([t]) for t in steps}
    train_items, test_items = load_split(cfg, "train"), load_split(cfg, "test")
    sampler = training_sampler(cfg, train_items)
    limits = {} if opts.max_epochs is None else {"max_epochs": opts.max_epochs}
    recipe = make_recipe(opts.recipe, config_batch=cfg.batch_size)
    store_dtype = store_dtype_name(opts.store_dtype, autocast)

    # A disk feature cache left by an interrupted sweep is only reused for the same model, data and blocks
    # (the checkpoint and the training images compared by content).
    check_writable(opts.out)
    os.makedirs(os.path.join(opts.out, "features"), exist_ok=True)
    check_settings(os.path.join(opts.out, "features", "settings.json"),
                   {"config": cfg.to_dict(), "model_flags": model_flags, "steps": steps, "blocks": blocks,
                    "seed": opts.seed, "store_dtype": store_dtype,
                    "model_sha256": path_sha256(cfg.model_path),
                    "training_data_sha256": data_sha256(train_items),
                    "extract_dtype": dtype_name(extract_dtype(opts.extract_dtype, device,
                                                              bool(model_flags.get("use_fp16"))))}, write=True)

    # Steps one after the other, so only one step's training features are held at a time.
    cells, ensembles = [], {}
    bar = progress_bar(total=len(steps) * len(blocks), desc="sweep cells")
    for t in steps:
        store_root = os.path.join(opts.out, "features", f"step_{t}")
        first_maps = extractors[t](train_items[0].image)
        batch = extract_batch_size(opts.extract_batch, memory_per_image(extractors[t]), device)
        store = extract_training_store(extractors[t], train_items, first_maps, store_root, opts.store,
                                       STORE_DTYPES[store_dtype], batch)
        for k, b in enumerate(blocks):
            channels, h, w = store.map_shapes[k]
            cell_store = single_map_store(store, k)
            ensemble = MLPEnsemble(channels, cfg.number_class, opts.members, seed=opts.seed).to(device)
            cell_recipe = recipe.for_maps([(channels, h, w)], store.image_size)
            train_members(ensemble, cell_store, sampler, cell_recipe, seed=opts.seed, device=device,
                          matmul_dtype=AUTOCAST[autocast], progress=False, **limits)
            ensembles[t, b] = ensemble
            cells.append({"step": t, "block": b, "channels": channels, "resolution": (h, w)})
            bar.update(1)
        del store
        shutil.rmtree(store_root, ignore_errors=True)
    bar.close()

    matrices = {key: ConfusionMatrix(cfg.number_class, cfg.ignore_label) for key in ensembles}
    bar = progress_bar(total=len(test_items), desc="evaluate cells")
    # Extractors that do not estimate their memory per image (None) get the default batch.
    sizes = [memory_per_image(e) for e in extractors.values()]
    batch = extract_batch_size(opts.extract_batch, None if None in sizes else max(sizes), device)
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
    shutil.rmtree(os.path.join(opts.out, "features"), ignore_errors=True)
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


