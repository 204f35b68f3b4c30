"""Load DDPM checkpoints (the official guided-diffusion files, or ours) safely and strictly.

Checkpoints are plain state_dicts. They are read with weights_only=True, so a file that carries pickled
code is refused instead of executed, and every failure names the file and what was expected.
"""

import json
import os
import pickle
import re
import warnings

import torch

from .script_util import create_model_and_diffusion, model_and_diffusion_defaults

MODEL_FLAGS_FILENAME = "model_flags.json"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, unsafe, or built with other flags."""


def safe_load(path: str, what: str = "checkpoint"):
    """torch.load on CPU with weights_only=True, turning torch's internal errors into one clear message."""
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path!r} is a folder; expected a checkpoint file inside it (e.g. a .pt file)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _looks_like_torch_file(path):
            raise CheckpointError(f"{what} {path!r} is not a PyTorch checkpoint: it is neither a zip archive "
                                  "(torch.save's format) nor a pickle (the legacy one)") from None
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{what} {path!r} was refused: it holds pickled objects other than tensors and plain containers, "
                "and loading it could execute code. Only state_dict checkpoints are accepted."
            ) from None
        raise CheckpointError(f"{what} {path!r} is not a PyTorch checkpoint ({e})") from None
    except Exception as e:  # torch's unpickler fails in many ways on foreign bytes (KeyError, IndexError, ...)
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{what} {path!r} is not a readable PyTorch checkpoint (truncated, corrupt or another format): {first_line}"
        ) from None


def _looks_like_torch_file(path: str) -> bool:
    """torch.save writes a zip archive, or (legacy) a pickle stream starting with PROTO 2+; other bytes (a
    truncated download, an image) are not a checkpoint, whatever torch's unpickler makes of them."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or starts_as_pickle(head)


def starts_as_pickle(head: bytes) -> bool:
    """Pickle streams of protocol 2 and later start with PROTO (0x80) and the protocol number."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_state_dict(path: str, what: str = "DDPM checkpoint", key: str = None) -> dict:
    """A flat state_dict {name: tensor}: the whole file, as guided-diffusion saves it, or the entry `key` of
    a wrapping dict (MAE's {'model': ...}, SwAV's {'state_dict': ...})."""
    obj = safe_load(path, what)
    state_dict = obj.get(key) if key is not None and isinstance(obj, dict) else obj
    if not isinstance(state_dict, dict) or not state_dict or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        found = f"keys {sorted(obj)[:5]}" if isinstance(obj, dict) else type(obj).__name__
        expected = "a state_dict of tensors" if key is None else f"{{{key!r}: state_dict of tensors}}"
        raise CheckpointError(f"{what} {path!r} is not usable: expected {expected}, found {found}")
    return state_dict


def _flag_hints(expected: dict, found: dict) -> list:
    """Guess which model flag explains a key/shape mismatch, from the parameters that reveal each flag."""
    unet_parts = ("time_embed.", "input_blocks.", "middle_block.", "output_blocks.", "out.", "label_emb.")
    if not any(k.startswith(unet_parts) for k in found):
        return [f"this is not a guided-diffusion UNet checkpoint: none of its {len(found)} keys "
                f"(e.g. {', '.join(list(found)[:3])}) belongs to one (time_embed, input_blocks, middle_block, "
                "output_blocks, out)"]
    hints = []

    def shape(sd, key):
        return tuple(sd[key].shape) if key in sd else None

    out_exp, out_found = shape(expected, "out.2.weight"), shape(found, "out.2.weight")
    if out_exp and out_found and out_exp[0] != out_found[0]:
        sigma = out_found[0] == 2 * out_exp[0]
        hints.append(
            f"the checkpoint predicts {out_found[0]} output channels, the model {out_exp[0]}: "
            f"try --learn_sigma {'True' if sigma else 'False'}"
        )
    emb_exp, emb_found = shape(expected, "time_embed.0.weight"), shape(found, "time_embed.0.weight")
    if emb_exp and emb_found and emb_exp[1] != emb_found[1]:
        hints.append(f"the checkpoint has {emb_found[1]} base channels: try --num_channels {emb_found[1]}")

    def num_input_blocks(sd):
        return len({int(m.group(1)) for k in sd for m in [re.match(r"input_blocks\.(\d+)\.", k)] if m})

    n_exp, n_found = num_input_blocks(expected), num_input_blocks(found)
    if n_exp != n_found:
        hints.append(
            f"the checkpoint has {n_found} input blocks, the model {n_exp}: the number of resolution levels "
            "or res blocks differs; check the image size (dim[0] of an experiment config, which overrides "
            "--image_size; --image_size in train-ddpm), which sets the default channel_mult, then --channel_mult "
            "and --num_res_blocks"
        )
    if ("label_emb.weight" in found) != ("label_emb.weight" in expected):
        hints.append(f"try --class_cond {'True' if 'label_emb.weight' in found else 'False'}")

    def count(sd, part):
        return sum(part in k for k in sd)

    if {k for k in expected if ".qkv." in k} != {k for k in found if ".qkv." in k}:
        hints.append("the attention layers differ: check --attention_resolutions (given as resolutions, e.g. 32,16,8)")
    if count(expected, ".op.") != count(found, ".op.") or count(expected, "in_layers") != count(found, "in_layers"):
        hints.append("the down/upsampling layers differ: check --resblock_updown")
    widths_differ = any(
        tuple(expected[k].shape) != tuple(v.shape) for k, v in found.items()
        if k in expected and k.startswith(("input_blocks.", "output_blocks.")) and k.endswith("in_layers.0.weight")
    )
    if widths_differ and emb_exp == emb_found:
        hints.append("the channel widths per level differ: check --channel_mult, or the image size (dim[0] of an "
                     "experiment config, --image_size in train-ddpm), which sets its default")

    def scale_shift(sd):
        # With scale-shift norm the timestep embedding gives 2 values (scale, shift) per output channel.
        emb, conv = shape(sd, "input_blocks.1.0.emb_layers.1.weight"), shape(sd, "input_blocks.1.0.out_layers.3.weight")
        return emb[0] == 2 * conv[0] if emb and conv else None

    if None not in (scale_shift(expected), scale_shift(found)) and scale_shift(expected) != scale_shift(found):
        hints.append(f"try --use_scale_shift_norm {scale_shift(found)}")
    return hints


def mismatch_report(expected: dict, found: dict) -> str:
    """The missing, unexpected and wrong-shape keys of state_dict `found` against `expected`, as indented
    listings ('' when they match)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong_shape = [
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]

    def listing(title, items):
        shown = "\n    ".join(items[:10]) + (f"\n    ... and {len(items) - 10} more" if len(items) > 10 else "")
        return f"  {title} ({len(items)}):\n    {shown}" if items else ""

    parts = [listing("missing keys", missing), listing("unexpected keys", unexpected),
             listing("shape mismatches", wrong_shape)]
    return "\n".join(p for p in parts if p)


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict, source: str, hints=_flag_hints) -> None:
    """load_state_dict(strict=True), but a mismatch lists the keys and shapes and, with `hints` (a function of
    the expected and found state_dicts; the UNet's flag guesses by default, None for other models), the cause."""
    expected = model.state_dict()
    report = mismatch_report(expected, state_dict)
    if report:
        causes = hints(expected, state_dict) if hints else []
        if causes and not set(expected) & set(state_dict):  # nothing in common: key listings would only be noise
            raise CheckpointError(f"{source!r} cannot be loaded: {causes[0]}")
        message = f"{source!r} does not match the model it is loaded into:\n" + report
        if causes:
            message += "\n  probable cause:\n    " + "\n    ".join(causes)
        raise CheckpointError(message)
    model.load_state_dict(state_dict, strict=True)


def model_flags_path(checkpoint_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), MODEL_FLAGS_FILENAME)


def read_model_flags(checkpoint_path: str):
    """The flags saved beside a checkpoint by `ddpm-seg train-ddpm`, or None for the official files."""
    path = model_flags_path(checkpoint_path)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            flags = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(flags, dict):
        raise CheckpointError(f"{path}: expected a JSON object of model flags")
    unknown = sorted(set(flags) - set(model_and_diffusion_defaults()))
    if unknown:
        raise CheckpointError(f"{path}: unknown model flags {unknown}")
    return flags


def load_ddpm(path: str, flags: dict, device=torch.device("cpu")):
    """Build (model, diffusion) from guided-diffusion flags, load `path` strictly, move to `device`, eval mode.

    use_fp16 halves the body's weights on CUDA, as the official code does; on CPU half-precision
    convolutions are slow or unsupported, so it warns and stays in float32.
    """
    defaults = model_and_diffusion_defaults()
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise ValueError(f"unknown model flags {unknown}; valid flags: {sorted(defaults)}")
    model, diffusion = create_model_and_diffusion(**{**defaults, **flags})
    load_state_dict_strict(model, read_state_dict(path), path)
    device = torch.device(device)
    model.to(device)
    if flags.get("use_fp16"):
        if device.type == "cuda":
            model.convert_to_fp16()
        else:
            warnings.warn("use_fp16 is ignored on CPU: the UNet runs in float32", stacklevel=2)
    model.eval()
    return model, diffusion
