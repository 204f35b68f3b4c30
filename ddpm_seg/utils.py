"""Small shared helpers: device choice, seeding and atomic file writes."""

import contextlib
import ctypes
import ctypes.util
import json
import os
import random
import tempfile

import numpy as np
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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16), from /proc/cpuinfo's flags."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


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


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that depends only on `keys` (e.g. run seed and member, sample or step index), so a piece
    of work is reproducible whatever order or process it runs in."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on failure removed.

    Readers therefore never see a half-written file, and an interrupted run leaves nothing behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file owner-only; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def read_json_object(path: str, what: str) -> dict:
    """A JSON file that must hold an object; bad JSON or another type is an error naming the file."""
    with open(path) as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object of {what}, found {type(obj).__name__}")
    return obj


def atomic_write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


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


def check_settings(path: str, settings: dict, write: bool) -> None:
    """Refuse to resume work saved with other settings (listed in the JSON file `path`); write the file
    (rank 0) when there is none yet."""
    if os.path.isfile(path):
        saved = read_json_object(path, "settings")
        differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if differ:
            raise ValueError(f"{path}: the files beside it were made with other settings "
                             f"({ {k: saved.get(k) for k in differ} } vs now { {k: settings.get(k) for k in differ} }); "
                             "use another output folder or delete that one")
    elif write:
        atomic_write_json(path, settings)
