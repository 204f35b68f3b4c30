"""The demo: the whole method on the demo "shapes" dataset with the shipped (or a freshly trained) demo DDPM,
the interpreter on its features beside baselines (raw pixels, backbones at random initialisation), the test
image of median mIoU, and the curve of mIoU against the DDPM's training steps. `ddpm-seg demo` runs it.
"""

import glob
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from guided_diffusion.script_util import model_and_diffusion_defaults

from .config import load_experiment, run_dir
from .data import read_image
from .ddpm_training import doubling_step, train_ddpm, train_ddpm_defaults
from .demo_data import generate_demo_dataset
from .evaluate import ConfusionMatrix
from .files import atomic_path, atomic_write_json
from .training import TrainOptions
from .training import run as run_interpreter
from .visualize import colorize, save_panels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_EXPERIMENT = os.path.join(REPO, "experiments", "demo", "ddpm.json")
# The EMA weights of the DDPM_TRAINING run (float32 state_dict), made by the command in docs/demo.md.
SHIPPED_DDPM = os.path.join(REPO, "experiments", "demo", "demo_ddpm.pt")
# The recipe of the shipped DDPM. float32: on CPUs without native bfloat16 (AVX2 only) bf16 autocast made
# each step ~30x slower, not faster. The trajectory is a function of the seed and step alone, so the
# checkpoint of step N is the same whether a run stops there or goes on.
DDPM_TRAINING = dict(batch_size=32, lr=5e-4, max_steps=32000, precision="fp32", ema_rate="0.995,0.999",
                     num_workers=0, save_interval=200, keep="doubling", log_interval=50)
SHIPPED_EMA_RATE = "0.999"
# The unlabelled pool is written only for --retrain; the labelled splits are what the demo itself needs.
DATASET = dict(num_pool=20000, num_train=20, num_test=50, num_val=50)
# --small: the same pipeline at toy sizes, for the test suite.
SMALL_DDPM_TRAINING = dict(DDPM_TRAINING, batch_size=8, max_steps=4, save_interval=2, log_interval=2)
SMALL_DATASET = dict(num_pool=16, num_train=6, num_test=6, num_val=6)
FEATURE_SIZES = {"mae": 12288, "swav": 6720, "swav_w2": 13440}
# The interpreter multiplies in float32: bfloat16 matmuls run ~100x slower than float32 on CPUs without
# native bfloat16, and at 32x32 pixels float32 costs little anywhere.
INTERPRETER_OPTIONS = {"store": "ram", "autocast": "none"}
PICTURE_SCALE = 4  # the 32x32 demo images drawn at 128x128
LABEL_WIDTH = 36  # pixels a step or mIoU label takes on the curve picture


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs and where: the demo command's flags, typed, with their defaults."""
    root: str = "."  # folder under which datasets/, checkpoints/ and pixel_classifiers/ are written
    device: str = "auto"  # auto | cpu | cuda[:i]
    seed: int = 0  # the data's, the interpreters' and (with retrain) the DDPM training's seed
    backbones: tuple = ()  # FEATURE_SIZES names, also run at random initialisation
    retrain: bool = False  # train the demo DDPM here with DDPM_TRAINING instead of using SHIPPED_DDPM
    curve: bool = False  # score the interpreter on the retrain run's saved EMA checkpoints instead of the demo
    small: bool = False  # toy sizes (SMALL_DATASET, SMALL_DDPM_TRAINING, 3 members)


def ddpm_dir(root):
    return os.path.join(root, "checkpoints", "demo")


def retrain_ddpm(cfg, flags, training, data_dir, seed, device):
    """Train the demo DDPM unless its final checkpoint exists; an interrupted training resumes."""
    model_path = cfg.model_path
    if os.path.isfile(model_path):
        print(f"using the demo DDPM trained here before, {model_path}")
        return
    out_dir = os.path.dirname(model_path)
    # train-ddpm resumes from the last complete checkpoint set in out_dir by itself.
    opts = {**train_ddpm_defaults(), **flags, **training, "data_dir": data_dir, "out_dir": out_dir, "seed": seed,
            "device": device}
    print(f"training the demo DDPM ({training['max_steps']} steps) on {data_dir} -> {out_dir}")
    result = train_ddpm(opts)
    # The final EMA under a fixed name (beside model_flags.json) is what the demo then reads.
    with atomic_path(model_path) as tmp:
        shutil.copyfile(result["ema"][float(SHIPPED_EMA_RATE)], tmp)


def baseline_configs(cfg, backbones):
    """The same experiment on other features: raw pixels, and each extra backbone at random initialisation."""
    root = os.path.dirname(cfg.exp_dir)
    configs = {"pixels": cfg.replace(model_type="pixels", dim=cfg.dim[:2] + [3], steps=[], blocks=[],
                                     exp_dir=os.path.join(root, "pixels"))}
    for name in backbones:
        configs[name] = cfg.replace(model_type=name, dim=cfg.dim[:2] + [FEATURE_SIZES[name]], steps=[], blocks=[],
                                    input_activations=name != "mae", exp_dir=os.path.join(root, name))
    return configs


def image_miou(pred, label, cfg):
    """mIoU of one image over the classes present in its ground truth or prediction."""
    matrix = ConfusionMatrix(cfg.number_class, cfg.ignore_label)
    matrix.update(pred, label)
    return float(np.nanmean(matrix.iou()))


def save_median_picture(path, cfg, results):
    """Draw the test image whose DDPM-prediction mIoU is the median of the test set: image | truth | DDPM's
    prediction | raw pixels' prediction. Returns the image's stem and mIoU."""
    pred_dirs = {title: os.path.join(results[title]["run_dir"], "predictions")
                 for title in ("DDPM (trained here)", "raw RGB pixels")}
    stems = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(cfg.testing_path, "*.npy")))
    stems = [s for s in stems if os.path.isfile(os.path.join(pred_dirs["DDPM (trained here)"], s + ".npy"))]
    labels = {s: np.load(os.path.join(cfg.testing_path, s + ".npy")) for s in stems}
    scores = {s: image_miou(np.load(os.path.join(pred_dirs["DDPM (trained here)"], s + ".npy")), labels[s], cfg)
              for s in stems}
    # The lower median for an even count; ties broken by name, so the choice is reproducible.
    stem = sorted(stems, key=lambda s: (scores[s], s))[(len(stems) - 1) // 2]
    image = read_image(os.path.join(cfg.testing_path, stem + ".png"))
    panels = [image, colorize(labels[stem], cfg.palette, cfg.ignore_label)]
    panels += [colorize(np.load(os.path.join(d, stem + ".npy")), cfg.palette, cfg.ignore_label)
               for d in pred_dirs.values()]
    save_panels(path, panels, ["image", "ground truth", "DDPM features", "raw RGB pixels"], scale=PICTURE_SCALE)
    return stem, scores[stem]


def saved_ema_steps(folder):
    """{step: path} of the ema_<SHIPPED_EMA_RATE>_<step>.pt files a train-ddpm run left in `folder`."""
    pattern = re.compile(rf"ema_{re.escape(SHIPPED_EMA_RATE)}_(\d+)\.pt")
    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = pattern.fullmatch(name)
        if match:
            found[int(match.group(1))] = os.path.join(folder, name)
    return dict(sorted(found.items()))


def curve_points(checkpoints):
    """The checkpoints the curve scores: the first saved step doubled again and again (200, 400, 800, ...: even
    points on the plot's log axis, and a few minutes each rather than one per saved checkpoint), and the last."""
    steps = sorted(checkpoints)
    return {s: checkpoints[s] for s in steps if s == steps[-1] or doubling_step(s, steps[0])}


def save_curve_picture(path, rows, baselines):
    """Line plot of mIoU % against training steps (log axis), with the baselines as horizontal lines."""
    width, height, left, right, top, bottom = 560, 320, 56, 16, 28, 40
    steps = np.log2([r["step"] for r in rows])
    lo_x, hi_x = steps.min() - 0.5, steps.max() + 0.5
    values = [100 * r["miou"] for r in rows] + [100 * v for v in baselines.values()]
    lo_y, hi_y = 0.0, max(10.0, 10 * np.ceil(max(values) / 10))

    def xy(log_step, miou):
        return (left + (log_step - lo_x) / (hi_x - lo_x) * (width - left - right),
                top + (1 - (miou - lo_y) / (hi_y - lo_y)) * (height - top - bottom))

    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.text((left, 6), "demo: interpreter mIoU % (test set) against the DDPM's training steps", fill=(0, 0, 0),
              font=font)
    for tick in np.arange(lo_y, hi_y + 1e-9, 10):
        x0, y = xy(lo_x, tick)
        draw.line((x0, y, width - right, y), fill=(225, 225, 225))
        draw.text((8, y - 6), f"{tick:.0f}", fill=(0, 0, 0), font=font)
    # A step closer than a label's width to one already labelled (the last step, just after a doubling one) keeps
    # its point but not its axis label; the last step is labelled first, so it always has one.
    labelled = []
    for r, log_step in reversed(list(zip(rows, steps))):
        x, y0 = xy(log_step, lo_y)
        if all(abs(x - other) >= LABEL_WIDTH for other in labelled):
            draw.text((x - 12, y0 + 6), str(r["step"]), fill=(0, 0, 0), font=font)
            labelled.append(x)
    draw.text((width // 2 - 40, height - 16), "training steps (log scale)", fill=(0, 0, 0), font=font)
    for (title, miou), colour in zip(baselines.items(), [(128, 128, 128), (200, 120, 0)]):
        x0, y = xy(lo_x, 100 * miou)
        draw.line((x0, y, width - right, y), fill=colour, width=1)
        draw.text((x0 + 4, y - 12), f"{title} {100 * miou:.1f}", fill=colour, font=font)
    points = [xy(s, 100 * r["miou"]) for r, s in zip(rows, steps)]
    draw.line(points, fill=(0, 90, 200), width=2)
    for i, ((x, y), r) in enumerate(zip(points, rows)):
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(0, 90, 200))
        crowded = i + 1 < len(points) and points[i + 1][0] - x < LABEL_WIDTH  # the next value's label would cover it
        draw.text((x + 5, y + 4 if crowded else y - 14), f"{100 * r['miou']:.1f}", fill=(0, 90, 200), font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def run_curve(cfg, flags, interpreter_opts, root):
    """The demo's interpreter on every saved EMA checkpoint of the --retrain run: [{step, miou, iou}]."""
    checkpoints = saved_ema_steps(ddpm_dir(root))
    if not checkpoints:
        raise FileNotFoundError(f"--curve: no ema_{SHIPPED_EMA_RATE}_<step>.pt in {ddpm_dir(root)}; "
                                "train them first with `ddpm-seg demo --retrain`")
    checkpoints = curve_points(checkpoints)
    rows = []
    for step, path in checkpoints.items():
        print(f"\n=== DDPM after {step} steps ===")
        step_cfg = cfg.replace(model_path=path, exp_dir=os.path.join(os.path.dirname(cfg.exp_dir), "curve",
                                                                    f"step_{step:06d}"))
        metrics = run_interpreter(step_cfg, DEMO_EXPERIMENT, flags, interpreter_opts)
        rows.append({"step": step, "miou": metrics["miou"], "iou": metrics["iou"]})
    return rows



def demo_config(opts: DemoOptions):
    """The demo experiment with its paths under opts.root, and the demo DDPM's model flags."""
    cfg = load_experiment(DEMO_EXPERIMENT)
    with open(os.path.join(os.path.dirname(DEMO_EXPERIMENT), "model_flags.json")) as f:
        flags = {**model_and_diffusion_defaults(), **json.load(f)}
    # The config's relative paths are taken under opts.root, so the demo can run anywhere.
    changes = {key: os.path.join(opts.root, getattr(cfg, key)) for key in ("exp_dir", "training_path", "testing_path")}
    changes["model_path"] = os.path.join(ddpm_dir(opts.root), "demo_ddpm.pt") if opts.retrain else SHIPPED_DDPM
    if opts.retrain:  # its own interpreter folders: a run never resumes ensembles trained on the other DDPM
        changes["exp_dir"] += "_retrained"
    if opts.small:
        changes.update(model_num=3, training_number=SMALL_DATASET["num_train"], testing_number=SMALL_DATASET["num_test"])
    return cfg.replace(**changes), flags


def write_curve(cfg, flags, interpreter_opts, root, start):
    """run_curve's rows as curve.json and curve.png (with the last demo summary's baselines) and a table."""
    rows = run_curve(cfg, flags, interpreter_opts, root)
    pc_root = os.path.dirname(cfg.exp_dir)
    summary_path = os.path.join(pc_root, "demo_summary.json")
    baselines = {}
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            results = json.load(f)["results"]
        baselines = {t: results[t]["miou"] for t in ("raw RGB pixels", "DDPM at random init") if t in results}
    out = os.path.join(pc_root, "curve")
    atomic_write_json(os.path.join(out, "curve.json"), rows)
    save_curve_picture(os.path.join(out, "curve.png"), rows, baselines)
    print("\n DDPM training steps   mIoU %")
    for r in rows:
        print(f" {r['step']:>19}   {100 * r['miou']:6.2f}")
    print(f"\nwrote {os.path.join(out, 'curve.png')} and curve.json in {time.time() - start:.0f} s")


def run_rows(cfg, flags, interpreter_opts, backbones):
    """The interpreter on each row's features: {title: {miou, iou, run_dir}}."""
    # "trained here" is the row's name that scripts read; it is the shipped DDPM unless --retrain.
    runs = {"DDPM (trained here)": (cfg, False)}
    runs["DDPM at random init"] = (cfg, True)
    for name, baseline in baseline_configs(cfg, backbones).items():
        runs["raw RGB pixels" if name == "pixels" else f"{name} at random init"] = (baseline, name != "pixels")
    results = {}
    for title, (run_cfg, random_init) in runs.items():
        print(f"\n=== {title} ===")
        metrics = run_interpreter(run_cfg, DEMO_EXPERIMENT, flags, replace(interpreter_opts, random_init=random_init))
        results[title] = {"miou": metrics["miou"], "iou": metrics["iou"],
                          "run_dir": run_dir(run_cfg, interpreter_opts.seed, random_init)}
    return results


def run_demo(opts: DemoOptions) -> None:
    """The demo, or with opts.curve the training-steps curve: the data, the DDPM, the interpreter runs, the
    median picture and demo_summary.json under opts.root, and the table on stdout."""
    start = time.time()
    cfg, flags = demo_config(opts)
    dataset = SMALL_DATASET if opts.small else DATASET
    if not opts.retrain:  # only training a DDPM reads the unlabelled pool
        dataset = dict(dataset, num_pool=0)
    paths = generate_demo_dataset(os.path.dirname(os.path.dirname(cfg.training_path)),
                                  image_size=cfg.dim[0], seed=opts.seed, **dataset)

    # train-interpreter's own defaults but these, so the demo runs it as the command line would.
    interpreter_opts = TrainOptions(seed=opts.seed, device=opts.device, **INTERPRETER_OPTIONS)
    if opts.curve:
        write_curve(cfg, flags, interpreter_opts, opts.root, start)
        return

    if opts.retrain:
        retrain_ddpm(cfg, flags, SMALL_DDPM_TRAINING if opts.small else DDPM_TRAINING, paths["unlabelled"],
                     opts.seed, opts.device)
    elif not os.path.isfile(SHIPPED_DDPM):
        raise FileNotFoundError(f"the shipped demo DDPM {SHIPPED_DDPM} is missing; restore it with git, or train "
                                "one with `ddpm-seg demo --retrain`")
    ddpm_done = time.time()

    results = run_rows(cfg, flags, interpreter_opts, opts.backbones)
    pc_root = os.path.dirname(cfg.exp_dir)
    picture = os.path.join(pc_root, "demo_prediction.png")
    stem, stem_miou = save_median_picture(picture, cfg, results)

    summary = {"results": results, "ddpm": cfg.model_path, "ddpm_s": ddpm_done - start,
               "total_s": time.time() - start, "median_image": {"stem": stem, "miou": stem_miou, "picture": picture}}
    atomic_write_json(os.path.join(pc_root, "demo_summary.json"), summary)
    print("\n features               mIoU %")
    for title, r in results.items():
        print(f" {title:<22} {100 * r['miou']:6.2f}")
    print(f"\nDDPM: {cfg.model_path}; data + DDPM: {summary['ddpm_s']:.0f} s, total: {summary['total_s']:.0f} s")
    print(f"test image of median mIoU ({stem}, {100 * stem_miou:.1f}) beside the raw-pixel baseline: {picture}; "
          f"every test picture in {os.path.join(results['DDPM (trained here)']['run_dir'], 'predictions')}")
