"""The students phase: prediction time per image on this CPU of the demo's interpreter, as the demo runs it,
beside student networks (the ones `ddpm-seg distill` trains) in PyTorch and, with the onnx extra, in onnxruntime.

The interpreter is the demo experiment's: the shipped demo DDPM with its model flags, the experiment's steps,
blocks, test views and members, features extracted in the precision the demo extracts in (auto) and a float32
ensemble. Its members and the students are at random initialisation: their time does not depend on their
weights. Every model segments the same demo scenes at the demo's image size, one image per call as predict does:
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


def demo_interpreter(seed):
    """The demo experiment's interpreter on the CPU: the shipped demo DDPM with its model flags, extracting in
    the demo's precision (auto), and the experiment's members in float32 at random initialisation."""
    cfg, flags = demo_config(DemoOptions(seed=seed))
    extractor = create_feature_extractor(cfg, flags, "cpu", seed=seed, config_path=DEMO_EXPERIMENT, dtype="auto")
    ensemble = MLPEnsemble(cfg.dim[-1], cfg.number_class, cfg.model_num, seed=seed).eval()
    return Interpreter(cfg, extractor, ensemble), dtype_name(extract_dtype("auto", "cpu", bool(flags.get("use_fp16"))))


def onnx_student(segmenter, path, threads):
    """`segmenter`'s network exported to `path` and run by onnxruntime on the CPU on `threads` threads, so that
    it is compared on the cores PyTorch gets (OnnxSegmenter.load takes CUDA where there is one, and every core)."""
    import onnxruntime

    export_onnx(segmenter, path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    # As OnnxSegmenter.load: threads spinning after a run would take the cores from the upsampling and vote.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return OnnxSegmenter(segmenter.cfg, session, segmenter.resolution[0], segmenter.architecture)


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


def timing_row(model, runtime, times, interpreter_s=None) -> dict:
    """A table row: the median seconds per image and what follows from it; speedup is the interpreter's median
    over this one (the interpreter's own row: its median over itself)."""
    median = statistics.median(times)
    return {"model": model, "runtime": runtime, "time_s": median, "times_s": times, "ms_per_image": 1000 * median,
            "images_per_s": 1 / median, "speedup": (interpreter_s or median) / median}


def format_row(r) -> str:
    line = (f"{r['model']:24s} {r['runtime']:11s} {r['ms_per_image']:10.1f} {r['images_per_s']:9.2f} "
            f"{r['speedup']:8.1f}x")
    if "label_agreement" in r:
        line += (f"   same labels as PyTorch on {100 * r['label_agreement']:.2f}% of pixels, logits within "
                 f"{r['max_abs_logit_diff']:.1e}")
    return line


def measure(opts, say):
    """The demo interpreter, then each of --students in PyTorch and (with the onnx extra) onnxruntime, on the same
    images. Prints the table; an ONNX row also says how far its labels and logits are from PyTorch's."""
    torch.set_num_threads(opts.threads)
    interpreter, interpreter_dtype = demo_interpreter(opts.seed)
    cfg = interpreter.cfg
    rng = np.random.default_rng(opts.seed)
    images = [render_scene(rng, cfg.dim[0])[0] for _ in range(opts.warmup + opts.predict_runs)]
    say(f"students: the demo interpreter ({len(cfg.steps)} steps x {len(cfg.blocks)} blocks, {cfg.test_views} test "
        f"views, {cfg.model_num} members, {interpreter_dtype} features) beside {', '.join(opts.students)} at "
        f"{opts.student_res}x{opts.student_res}")
    times, _ = time_segment(interpreter, images, opts.warmup)
    rows = [timing_row(INTERPRETER, "pytorch", times)]
    say("  " + format_row(rows[0]))
    interpreter_s = rows[0]["time_s"]
    onnx = all(importlib.util.find_spec(name) for name in ONNX_MODULES)
    torch.manual_seed(opts.seed)  # the students' random weights
    with tempfile.TemporaryDirectory() as tmp:
        for name in opts.students:
            student = NetworkSegmenter(cfg, build_network(name, cfg.number_class).eval(), opts.student_res, name)
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
