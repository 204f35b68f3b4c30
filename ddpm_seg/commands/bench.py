"""`ddpm-seg bench`: peak memory and speed of our interpreter pipeline beside the original one, the cost of
diffusers backbones and of the other backbones' configs, and the prediction time of students beside the demo's
interpreter.

Phases, each approach in its own fresh process so that its peak RSS (ru_maxrss, which never goes
down) is its own:
  store    extraction-to-store: ours puts native-resolution bfloat16 maps into a FeatureStore; the
           original upsamples every map to full resolution in float32 and builds one [N*H*W, D] tensor.
  train    ours trains all members at once (train_ensemble, --batch pixels per member, bf16 matmuls)
           over the store of N images; the original trains nn.Sequential members one after another
           from a shuffled DataLoader over that tensor, batch 64, float32.
  predict  one image, all members, majority vote: predict_logits (first Linear at native resolution)
           against every member on the [H*W, D] full-resolution features.
  quality  both learn the same synthetic task from the same initial members, each member seeing the
           same number of pixels (--quality-epochs passes over the training pixels), each with its
           own batch size; mIoU on held-out images. This is what makes the train speed ratio a ratio
           at equal mIoU: both approaches get equally far through the data, ours in less time.

  e2e      (not run by default) the bedroom_28-shaped experiment end to end: `ddpm-seg train-interpreter`
           run as a user runs it, on generated 256x256 scenes (--n training, --test_n test images) with
           the paper's UNet at random weights (--random_init: nothing downloaded), steps 50,150,250,
           blocks 5,6,7,8,12, --members members, --recipe (default: train-interpreter's, fast). Its own
           timings per phase (extract train, train ensemble, evaluate) and peak RSS, beside the original's
           cost computed from its per-image forward (full UNet, float32, one step per forward) and its
           training speed (batch 64, float32) over the shortest run its stopping rule allows, both
           measured in the same run (see e2e_formulas in the output).
  diffusers (not run by default, needs the diffusers extra) feature sizes and extraction time per image of
           Stable Diffusion 1.5- and SDXL-sized UNets (--archs) at random initialisation through the
           diffusers backbone, in each of --dtypes, at --size for --steps: --warmup untimed images, then
           --images timed ones, in this process on --threads threads. Nothing is downloaded.
  students (not run by default) prediction time per image of the demo's interpreter as the demo runs it (the
           shipped demo DDPM, its test views and members, at random member weights) beside each of --students
           (random weights) at --student_res, in PyTorch and, with the onnx extra, in onnxruntime: the same
           32x32 demo scenes, one per call, --warmup untimed, then the median of --predict_runs, in this process
           on --threads threads. The ONNX rows say how far their labels and logits are from PyTorch's.
  backbones (not run by default) extraction time per image of the backbones of experiment configs (--configs;
           default ALAE, VDVAE, GAN Encoder, GAN Inversion and DINOv2 ones) at paper size and random weights, in
           each of --dtypes: --warmup untimed images, then the median of --images, in this process on --threads
           threads. GAN Inversion runs --inversion_steps projector steps: seconds per step, and its config's own
           steps at that rate.

Activations of store, train, predict and quality are synthetic (deterministic random maps at the chosen layout),
so no checkpoint is needed. The original needs about 2.2 GB per 256x256 image at the paper's layout, so it runs
at a small N and its N-image figures are computed (formulas printed beside them). CPU only, but for e2e's own
run (--device cuda runs train-interpreter on the GPU; the original's figures stay CPU ones): it measures
host memory and CPU time. Linux only (reads /proc and ru_maxrss in KiB).
"""

import argparse
import dataclasses
import os
from functools import partial

from ..backbones import EXTRACT_DTYPES
from ..benchmarks import backbones, e2e, prediction, quality, stable_diffusion, store, students, training
from ..benchmarks.extraction import E2E, e2e_layout
from ..benchmarks.harness import GB
from ..benchmarks.options import BenchOptions
from ..benchmarks.summary import check_targets, format_table, formulas
from ..benchmarks.synthetic import SYNTHETIC_PHASES, layout_summary
from ..deeplab import NETWORKS
from ..device import cpu_model
from ..files import atomic_write_json
from .flags import options_from_flags

# Every phase's measurement, in the order they run.
MEASURES = {"store": store.measure, "train": training.measure, "predict": prediction.measure, "e2e": e2e.measure,
            "quality": quality.measure, "diffusers": stable_diffusion.measure, "students": students.measure,
            "backbones": backbones.measure}
PHASES = tuple(MEASURES)
DEFAULT_PHASES = SYNTHETIC_PHASES
TABLE_PHASES = SYNTHETIC_PHASES + ("e2e",)  # the phases with rows in the summary table
SYNTHETIC_N = 50  # --n of the synthetic phases when not given


def tabled(opts):
    """Whether a phase of the summary table runs (the diffusers phase prints its own)."""
    return any(phase in opts.phases for phase in TABLE_PHASES)


def run_bench(opts):
    """Run the selected phases (each approach in its own process); returns the results dict."""
    layout = layout_summary(opts.small)
    results = {"config": {k: v for k, v in dataclasses.asdict(opts).items() if k != "json"}, "layout": layout, "cpu": cpu_model()}
    say = partial(print, flush=True) if not opts.quiet else (lambda *a, **k: None)
    say(f"CPU: {results['cpu']}")
    if tabled(opts):
        height, width = layout["image_size"]
        say(f"layout: {len(layout['map_shapes'])} maps, {layout['features']} features per pixel, {height}x{width} "
            f"images; full-res float32 {layout['full_res_bytes_per_image'] / GB:.3f} GB/image, 16-bit store "
            f"{layout['store_bytes_per_image'] / GB:.4f} GB/image; {opts.threads} threads")
    for phase, measure in MEASURES.items():
        if phase in opts.phases:
            results[phase] = measure(opts, say)
    results["targets"] = check_targets(results)
    results["formulas"] = formulas(results)
    return results


def int_at_least(low):
    """An argparse type: an integer >= low."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


positive_int = int_at_least(1)


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def subset_of(choices):
    """An argparse type: a comma-separated, non-empty subset of `choices`, as a list."""
    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items or any(item not in choices for item in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {text!r}")
        return items
    return parse


def int_list(text):
    return [int(item) for item in text.split(",")]


def build_parser():
    parser = argparse.ArgumentParser(prog="ddpm-seg bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=positive_int, default=None,
                        help=f"training images: for our store and training ({SYNTHETIC_N} if not given), and for "
                             f"e2e ({E2E['n']}, bedroom_28's, if not given)")
    parser.add_argument("--test_n", "--test-n", type=positive_int, default=E2E["test_n"],
                        help="e2e: test images (bedroom_28's 20)")
    parser.add_argument("--extract_dtype", "--extract-dtype", choices=["auto"] + sorted(EXTRACT_DTYPES),
                        default="auto", help="e2e: train-interpreter's --extract_dtype")
    parser.add_argument("--extract_batch", "--extract-batch", type=positive_int, default=None,
                        help="e2e: train-interpreter's --extract_batch (default: its own, from free memory)")
    parser.add_argument("--orig-n", type=positive_int, default=2,
                        help="training images for the original approach (about 2.2 GB each at the paper layout)")
    parser.add_argument("--members", type=positive_int, default=10)
    parser.add_argument("--train-steps", type=positive_int, default=200, help="timed training steps per member")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="torch threads per phase")
    parser.add_argument("--phases", type=subset_of(PHASES), default=list(DEFAULT_PHASES),
                        help=f"any of {','.join(PHASES)} (default {','.join(DEFAULT_PHASES)})")
    parser.add_argument("--store", choices=["ram", "disk"], default="ram", help="where our store keeps its maps")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="our pixels per member per step, Adam lr 1e-3 * sqrt(batch / 64) (the original keeps "
                             "the paper's 64 and 1e-3); default 1024, and in e2e train-interpreter's own default")
    parser.add_argument("--device", default="cpu", help="e2e: train-interpreter's --device (cpu, cuda, auto)")
    parser.add_argument("--recipe", choices=["fast", "paper"], default="fast",
                        help="e2e: train-interpreter's --recipe (the default, fast; or the paper's)")
    parser.add_argument("--projection_width", "--projection-width", type=int, default=0,
                        help="train, quality: ours on the features projected to this many principal directions per "
                             "resolution, as train-interpreter's fast recipe (default 0: all features)")
    parser.add_argument("--fp32", action="store_true",
                        help="our first-layer matmuls in float32 (float16 store) even where this CPU has native "
                             "bfloat16 (without it they are float32 anyway, as train-interpreter's --autocast auto)")
    parser.add_argument("--classes", type=positive_int, default=10, help="classes of the synthetic task")
    parser.add_argument("--predict_runs", "--predict-runs", type=positive_int, default=3,
                        help="timed predictions (median reported); students: timed images per model")
    parser.add_argument("--quality-n", type=positive_int, default=2, help="training images of the quality check")
    parser.add_argument("--quality-test", type=positive_int, default=2, help="held-out images of the quality check")
    parser.add_argument("--quality-epochs", type=positive_float, default=1.0,
                        help="passes over the training pixels per member in the quality check")
    parser.add_argument("--archs", type=subset_of(tuple(stable_diffusion.ARCHS)), default=list(stable_diffusion.ARCHS),
                        help="diffusers: comma list of " + ", ".join(stable_diffusion.ARCHS))
    parser.add_argument("--dtypes", type=subset_of(tuple(stable_diffusion.DTYPES)),
                        default=list(stable_diffusion.DTYPES),
                        help="diffusers, backbones: comma list of " + ", ".join(stable_diffusion.DTYPES))
    parser.add_argument("--size", type=int_at_least(64), default=256, help="diffusers: image side in pixels")
    parser.add_argument("--steps", type=int_list, default=[50, 150],
                        help="diffusers: diffusion steps, one forward of all of them per image (default 50,150)")
    parser.add_argument("--images", type=positive_int, default=3, help="diffusers, backbones: timed images per model and dtype")
    parser.add_argument("--warmup", type=int_at_least(0), default=1,
                        help="diffusers, backbones, students: untimed images before the timed ones")
    parser.add_argument("--students", type=subset_of(tuple(NETWORKS)), default=list(students.DEFAULT_STUDENTS),
                        help=f"students: comma list of {', '.join(NETWORKS)} "
                             f"(default {','.join(students.DEFAULT_STUDENTS)})")
    parser.add_argument("--student_res", "--student-res", type=int_at_least(32), default=128,
                        help="students: their input size (images are resized to it, logits back)")
    parser.add_argument("--configs", type=lambda text: [p for p in text.split(",") if p],
                        default=list(backbones.DEFAULT_CONFIGS),
                        help="backbones: comma list of experiment configs (default " + ",".join(backbones.DEFAULT_CONFIGS) + ")")
    parser.add_argument("--inversion_steps", "--inversion-steps", type=positive_int, default=3,
                        help="backbones: projector steps of a GAN Inversion config (its own are extrapolated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true",
                        help="a tiny layout (64x64 images, 1/16 of the channels; e2e: a tiny UNet on 32x32 images)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or phase lines, only the table (and the diffusers phase's summary)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def main(argv):
    args = build_parser().parse_args(argv)
    if args.classes < 2:
        raise ValueError(f"--classes must be at least 2, got {args.classes}")
    opts = options_from_flags(BenchOptions, args, n=args.n or SYNTHETIC_N, batch=args.batch or 1024,
                              e2e_n=args.n or e2e_layout(args)["n"], e2e_batch=args.batch)
    results = run_bench(opts)
    if tabled(args):
        print(format_table(results))
    for name, formula in results["formulas"].items():
        print(f"{name}: {formula}")
    if args.json:
        atomic_write_json(args.json, results)
