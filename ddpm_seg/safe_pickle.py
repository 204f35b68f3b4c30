"""Read foreign network pickles without running anything they carry.

NVIDIA's StyleGAN2 releases are plain pickles: the TensorFlow ones of `dnnlib.tflib.network.Network` objects
(their state holds the build function's source and numpy arrays of named variables), the StyleGAN2-ADA ones of
`torch_utils.persistence` objects, whose reconstructor executes the module source stored in the file. Loading
either with `pickle` runs code from the file. `load_pickle` reads them with an unpickler that resolves only an
explicit list of globals: numpy array and scalar reconstruction, plain containers, torch's tensor rebuild
functions, and the two foreign classes, which are replaced by inert stand-ins that keep their state and never
execute it. Any other global is refused with one line naming the file and the global.
"""

import _compat_pickle
import collections
import io
import os
import pickle

import numpy as np
import torch

from guided_diffusion.checkpoint import CheckpointError, starts_as_pickle


class TFNetworkState:
    """Stand-in for `dnnlib.tflib.network.Network`: keeps the pickled state (name, static_kwargs, components,
    variables); the build module source in it is never executed."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise CheckpointError(f"a TensorFlow network's state should be a dict, found {type(state).__name__}")
        self.state = state


class PersistentObject:
    """Stand-in for an object rebuilt by `torch_utils.persistence`: its class name and its pickled state (for a
    torch module: `_parameters`, `_buffers`, `_modules`, `_init_kwargs`, ...); its module source is kept, unused."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
            raise CheckpointError("a torch_utils.persistence record should be a dict with type 'class' and a "
                                  "state dict")
        self.class_name = meta.get("class_name")
        self.state = meta["state"]


class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict`: a dict (its attribute access is not needed)."""


def load_storage_from_bytes(data: bytes):
    """Replacement for `torch.storage._load_from_bytes`: the bytes are a torch.save of one storage, read with
    weights_only=True so that they cannot name code either."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    """Replacement for `_codecs.encode`, which protocol-2 pickles use to write bytes; only latin-1 is allowed."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise CheckpointError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _numpy_core():
    return getattr(np, "_core", None) or np.core


def _allowed_globals() -> dict:
    """(module, name) -> the object the unpickler may return for it."""
    core = _numpy_core()
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("_codecs", "encode"): encode_latin1,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): load_storage_from_bytes,
        ("dnnlib.tflib.network", "Network"): TFNetworkState,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentObject,
        ("dnnlib.util", "EasyDict"): EasyDict,
    }
    # Pickles written with numpy 1 name numpy.core, with numpy 2 numpy._core.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return allowed


ALLOWED_GLOBALS = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED_GLOBALS; `source` names the file in its errors."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        # Python 2 names (__builtin__.set) in protocol-2 pickles, mapped as the default find_class does; no
        # Python 3 module bears one of these names.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        raise CheckpointError(f"{self.source!r} was refused: it names the global {module}.{name}, which is not a "
                              "known part of a StyleGAN2 network pickle, and loading it could execute code")

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.source!r} was refused: it holds a persistent reference {str(pid)[:60]!r}, "
                              "which plain network pickles do not")


def is_pickle(path: str) -> bool:
    with open(path, "rb") as f:
        return starts_as_pickle(f.read(2))


def load_pickle(path: str, what: str = "network pickle"):
    """The object pickled in `path`, with only ALLOWED_GLOBALS resolved (see the module docstring)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if not is_pickle(path):
        raise CheckpointError(f"{what} {path!r} is not a pickle (protocol 2 or later)")
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, path).load()
        except CheckpointError as e:
            if path in str(e):
                raise
            raise CheckpointError(f"{what} {path!r} is not usable: {e}") from None
        except Exception as e:  # truncated or corrupt streams fail in many ways (EOFError, UnpicklingError, ...)
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{what} {path!r} is not a readable pickle (truncated or corrupt): "
                                  f"{type(e).__name__}: {first_line}") from None
