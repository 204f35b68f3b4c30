"""What every benchmark phase shares: a job run in a fresh process that reports its own base and peak RSS,
the median of timed runs, and the precision our pipeline trains at on this CPU.

Linux only: RSS is read from /proc/self/status and ru_maxrss (KiB on Linux).
"""

import multiprocessing
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from ..device import fast_bf16

GB = 1e9
IGNORE_LABEL = 255
WARMUP_STEPS = 3  # untimed steps first, so one-off kernel setup is not billed to either approach


def current_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError("/proc/self/status has no VmRSS line")


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_isolated(job, opts, *extra):
    """job(opts, *extra) in a fresh process (ru_maxrss never goes down, so a peak is only a job's own in a
    process of its own); its result gets that process's base and peak RSS."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child, job, opts, *extra).result()


def _child(job, opts, *extra):
    torch.set_num_threads(opts.threads)
    base = current_rss()
    result = job(opts, *extra)
    result.update(base_rss=base, peak_rss=peak_rss())
    return result


def timed_runs(runs, predict):
    """predict() `runs` times: the median and every time in seconds, and the last answer as uint8 numpy
    (numpy, not a tensor: a tensor would travel through shared memory of a process that is exiting)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        pred = predict()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "times_s": times, "pred": pred.numpy().astype(np.uint8)}


def bf16_matmuls(opts):
    """Our first-layer matmuls in bfloat16: unless --fp32, where this CPU has native bf16 (as --autocast auto)."""
    return not opts.fp32 and fast_bf16("cpu")


def store_dtype(opts):
    # With bf16 matmuls the features are rounded to bfloat16 before use anyway: store them so.
    return torch.bfloat16 if bf16_matmuls(opts) else torch.float16


def time_extraction(extractor, images, warmup: int) -> list:
    """Seconds per image, one image per call, after `warmup` untimed images."""
    for image in images[:warmup]:
        extractor(image)
    times = []
    for image in images[warmup:]:
        start = time.perf_counter()
        extractor(image)
        times.append(time.perf_counter() - start)
    return times
