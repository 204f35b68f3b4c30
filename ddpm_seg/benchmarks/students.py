"""The students phase: prediction time per image on this CPU of the demo's interpreter, as the demo runs it,
beside student networks (the ones `ddpm-seg distill` trains) in PyTorch and, with the onnx extra, in onnxruntime.

The interpreter is the demo experiment's: the shipped demo DDPM with its model flags, the experiment's steps,
blocks, test views and members, features extracted in the precision the demo extracts in (auto) and a float32
ensemble. Its members and the students are at random initialisation: their time does not depend on their
weights. A random network's BatchNorm statistics (mean 0, variance 1) do not fit its activations, which leaves
its labels all but constant over an image; the students' are taken from other demo scenes first, so that their
labels vary over an image as a trained network's do and the ONNX rows' agreement with PyTorch means something.
Every model segments the same demo scenes at the demo's image size, one image per call as predict does:
--warmup untimed images, then --predict_runs timed ones, the median reported. All in this process on --threads
threads, onnxruntime included.
"""

import importlib.util
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from ..backbones import create_feature_extractor, dtype_name, extract_dtype
from ..deeplab import NetworkSegmenter, build_network
from ..demo import DEMO_EXPERIMENT, DemoOptions, demo_config
from ..demo_data import render_scene
from ..ensemble import MLPEnsemble
from ..interpreter import Interpreter
from ..onnx_export import OnnxSegmenter, check_export, export_onnx

DEFAULT_STUDENTS = ("lraspp_mobilenet_v3", "deeplabv3_mobilenet_v3")
INTERPRETER = "demo interpreter"
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")  # what export_onnx and OnnxSegmenter import
NO_ONNX = "onnx extra not installed"
# Further demo images the students' BatchNorm statistics are taken from, in one batch: more than one, as
# training mode needs for the 1x1 maps of DeepLabV3's pooling branch.
CALIBRATION_IMAGES = 8


def demo_interpreter(seed):
    """The demo experiment's interpreter on the CPU: the shipped demo DDPM with its model flags, extracting in
    the demo's precision (auto), and the experiment's members in float32 at random initialisation; returned with
    the name of that precision."""
    cfg, flags = demo_config(DemoOptions(seed=seed))
    extractor = create_feature_extractor(cfg, flags, "cpu", seed=seed, config_path=DEMO_EXPERIMENT, dtype="auto")
    ensemble = MLPEnsemble(cfg.dim[-1], cfg.number_class, cfg.model_num, seed=seed).eval()
    return Interpreter(cfg, extractor, ensemble), dtype_name(extract_dtype("auto", "cpu", bool(flags.get("use_fp16"))))


def random_student(name, cfg, resolution, images):
    """A NetworkSegmenter of network `name` at random initialisation, in eval mode, its BatchNorm statistics
    those of its activations on `images` (one forward in training mode)."""
    model = build_network(name, cfg.number_class)
    segmenter = NetworkSegmenter(cfg, model, resolution, name)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # the plain average over the forwards: here, the one batch's statistics
    model.train()
    with torch.no_grad():
        model(segmenter.input_tensor(images))
    model.eval()
    return segmenter


def onnx_student(segmenter, path, threads):
    """`segmenter`'s network exported to `path` and run by onnxruntime on the CPU on `threads` threads, so that
    it is compared on the cores PyTorch gets."""
    export_onnx(segmenter, path)
    return OnnxSegmenter.load(path, cpu_threads=threads)


def time_segment(segmenter, images, warmup):
    """Seconds per image of segmenter.segment, one image per call after `warmup` untimed images, and the labels
    of the timed images [N, H, W]."""
    for image in images[:warmup]:
        segmenter.segment([image])
    times, labels = [], []
    for image in images[warmup:]:
        start = time.perf_counter()
        (image_labels, _, _), = segmenter.segment([image])
        times.append(time.perf_counter() - start)
        labels.append(image_labels)
    return times, np.stack(labels)


def timing_row(model, runtime, times, interpreter_s) -> dict:
    """A table row: the median seconds per image and what follows from it, the speed-up being the interpreter's
    median seconds over this one's."""
    median = statistics.median(times)
    return {"model": model, "runtime": runtime, "time_s": median, "times_s": times, "ms_per_image": 1000 * median,
            "images_per_s": 1 / median, "speedup": interpreter_s / median}


def format_row(r) -> str:
    line = (f"{r['model']:24s} {r['runtime']:11s} {r['ms_per_image']:10.1f} {r['images_per_s']:9.2f} "
            f"{r['speedup']:8.1f}x")
    if "label_agreement" in r:
        line += (f"   same labels as PyTorch on {100 * r['label_agreement']:.2f}% of pixels, logits within "
                 f"{r['max_abs_logit_diff']:.1e}")
    return line


def measure(opts, say):
    """The demo interpreter, then each of --students in PyTorch and (with the onnx extra) onnxruntime, on the same
    images. Prints the table; an ONNX row also says how far its labels and logits are from PyTorch's. Runs on
    --threads threads and gives the process its own thread count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        return timed_table(opts, say)
    finally:  # a caller in the same process (the tests) keeps its float sums split as before
        torch.set_num_threads(threads)


def timed_table(opts, say):
    interpreter, interpreter_dtype = demo_interpreter(opts.seed)
    cfg = interpreter.cfg
    rng = np.random.default_rng(opts.seed)
    images = [render_scene(rng, cfg.dim[0])[0] for _ in range(opts.warmup + opts.predict_runs)]
    calibration = [render_scene(rng, cfg.dim[0])[0] for _ in range(CALIBRATION_IMAGES)]
    say(f"students: the demo interpreter ({len(cfg.steps)} steps x {len(cfg.blocks)} blocks, {cfg.test_views} test "
        f"views, {cfg.model_num} members, {interpreter_dtype} features) beside {', '.join(opts.students)} at "
        f"{opts.student_res}x{opts.student_res}")
    times, _ = time_segment(interpreter, images, opts.warmup)
    interpreter_s = statistics.median(times)
    rows = [timing_row(INTERPRETER, "pytorch", times, interpreter_s)]
    say("  " + format_row(rows[0]))
    onnx = all(importlib.util.find_spec(name) for name in ONNX_MODULES)
    torch.manual_seed(opts.seed)  # the students' random weights
    with tempfile.TemporaryDirectory() as tmp:
        for name in opts.students:
            student = random_student(name, cfg, opts.student_res, calibration)
            times, labels = time_segment(student, images, opts.warmup)
            rows.append(timing_row(name, "pytorch", times, interpreter_s))
            say("  " + format_row(rows[-1]))
            if not onnx:
                continue
            runtime = onnx_student(student, os.path.join(tmp, f"{name}.onnx"), opts.threads)
            times, onnx_labels = time_segment(runtime, images, opts.warmup)
            rows.append(timing_row(name, "onnxruntime", times, interpreter_s))
            rows[-1]["label_agreement"] = float((onnx_labels == labels).mean())
            rows[-1]["max_abs_logit_diff"] = check_export(student, runtime, images[opts.warmup:])["max_abs_logit_diff"]
            say("  " + format_row(rows[-1]))
    size = cfg.dim[0]
    print(f"\nprediction per {size}x{size} demo image (median of {opts.predict_runs} after {opts.warmup} untimed), "
          f"{torch.get_num_threads()} threads:")
    print(f"{'model':24s} {'runtime':11s} {'ms/image':>10s} {'images/s':>9s} {'speed-up':>9s}")
    for r in rows:
        print(format_row(r))
    if not onnx:
        print(f"onnxruntime: {NO_ONNX}")
    return {"image_size": size, "images": opts.predict_runs, "warmup": opts.warmup, "threads": torch.get_num_threads(),
            "student_res": opts.student_res, "interpreter_extract_dtype": interpreter_dtype,
            "interpreter_views": cfg.test_views, "interpreter_members": cfg.model_num, "rows": rows,
            "onnx_note": None if onnx else NO_ONNX}
