"""The machine: which device, what its CPU computes natively, how much memory is free, and torchrun's
process group."""

import contextlib
import ctypes
import ctypes.util
import os

import torch
import torch.distributed as dist

def resolve_device(name: str = "auto") -> torch.device:
    """Turn --device auto|cpu|cuda[:i] into a torch.device, with a clear error for a device this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu or cuda[:index], got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:index], got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"--device {name} was requested but this machine has {count} CUDA device(s); "
                             "use --device cpu or auto")
    return device


# The CPU flags of native bfloat16 arithmetic. Without them oneDNN emulates bf16: measured 15-50x slower
# than float32 on an AVX2-only CPU (AMD EPYC, 2 cores), convolutions and matmuls alike.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# Set to 1 or 0, this overrides the flags: a CPU is treated as having native bf16 or not, so that every "auto"
# precision choice (--extract_dtype, --autocast, --store_dtype) is the one another machine would make.
NATIVE_BF16_ENV = "DDPM_SEG_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16), from /proc/cpuinfo's flags, unless
    the environment variable DDPM_SEG_CPU_BF16 is 1 (yes) or 0 (no)."""
    override = os.environ.get(NATIVE_BF16_ENV, "")
    if override in ("0", "1"):
        return override == "1"
    if override:
        raise ValueError(f"environment variable {NATIVE_BF16_ENV} must be 0 or 1, got {override!r}")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


def cpu_model() -> str:
    """This CPU's model name and its widest matmul feature (amx_bf16, avx512_bf16, avx512f or avx2), from
    /proc/cpuinfo, for figures that depend on it; "unknown CPU" where it cannot be read."""
    name, flags = "unknown CPU", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    widest = next((flag for flag in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if flag in flags), "no AVX2")
    return f"{name} ({os.cpu_count()} cores, {widest})"


def fast_bf16(device) -> bool:
    """Whether bfloat16 matmuls pay on `device`: on CUDA, and on CPUs with native bf16."""
    return torch.device(device).type == "cuda" or cpu_has_native_bf16()


def available_memory_bytes(device="cpu") -> int:
    """Free memory of `device`: the GPU's free bytes, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def keep_freed_memory() -> None:
    """Have glibc keep freed memory for reuse instead of handing it back to the OS at once.

    Ensemble training allocates blocks of tens of MB every step (gathered features, the cast weight,
    its gradient). glibc serves blocks over 32 MB with fresh mmaps and unmaps them on free, so each
    step page-faults through them again: converting the 10.8M-element first-layer gradient took 9.8 ms
    that way and 1.3 ms from reused memory (2-core CPU). The process keeps what it freed (its RSS
    stays near its peak). No-op off glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    mallopt(m_mmap_max, 0)  # large blocks come from the heap, so free() keeps them for the next step
    mallopt(m_trim_threshold, 2**31 - 1)  # and the heap top is not trimmed back after every step


@contextlib.contextmanager
def distributed(device_name):
    """Yield (rank, world_size, device) from torchrun's environment, or (0, 1, device) without it.

    Under torchrun the process group (NCCL on CUDA, gloo on CPU) is created here and destroyed on exit."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size == 1:
        yield 0, 1, device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    initialised_here = not dist.is_initialized()
    if initialised_here:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        if initialised_here:
            dist.destroy_process_group()
