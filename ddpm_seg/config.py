"""Experiment configs: the original ddpm-segmentation JSON files, loaded unchanged and validated."""

import os

from .utils import read_json_object

# key -> (expected type, required). The original files carry a few keys the code never reads
# (max_training, validation_path, category); they are accepted so those files load unchanged.
EXPERIMENT_KEYS = {
    "exp_dir": (str, True),
    "model_type": (str, True),
    "category": (str, False),
    "number_class": (int, True),
    "ignore_label": (int, True),
    "training_path": (str, True),
    "validation_path": (str, False),
    "testing_path": (str, True),
    "model_path": (str, True),
    "dim": (list, True),
    "steps": (list, True),
    "blocks": (list, True),
    "model_num": (int, True),
    "batch_size": (int, True),
    "max_training": (int, False),
    "training_number": (int, True),
    "testing_number": (int, True),
    "upsample_mode": (str, True),
    "share_noise": (bool, True),
    "input_activations": (bool, True),
    "deeplab_res": (int, False),
    # Ours, for datasets outside the paper's six (their names come from the packaged class table).
    "class_names": (list, False),
    "palette": (list, False),  # flat [r0, g0, b0, r1, ...], one colour per class
}


def _check_int_list(path, key, value, length=None):
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{path}: {key!r} must be a list of integers, got {value!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{path}: {key!r} must have {length} entries, got {value!r}")
    if any(v < 0 for v in value):
        raise ValueError(f"{path}: {key!r} must not contain negative values, got {value!r}")


def validate_experiment(cfg: dict, path: str = "<config>") -> dict:
    unknown = sorted(set(cfg) - set(EXPERIMENT_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys are {sorted(EXPERIMENT_KEYS)}")
    missing = sorted(k for k, (_, required) in EXPERIMENT_KEYS.items() if required and k not in cfg)
    if missing:
        raise ValueError(f"{path}: missing required key(s) {missing}")
    for key, value in cfg.items():
        expected = EXPERIMENT_KEYS[key][0]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"{path}: {key!r} must be of type {expected.__name__}, got {value!r}")
    _check_int_list(path, "dim", cfg["dim"], length=3)
    _check_int_list(path, "steps", cfg["steps"])
    _check_int_list(path, "blocks", cfg["blocks"])
    if min(cfg["dim"]) <= 0:
        raise ValueError(f"{path}: 'dim' entries must be positive, got {cfg['dim']}")
    for key in ("number_class", "model_num", "batch_size", "training_number", "testing_number"):
        if cfg[key] <= 0:
            raise ValueError(f"{path}: {key!r} must be positive, got {cfg[key]}")
    names = cfg.get("class_names")
    if names is not None and (len(names) != cfg["number_class"] or not all(isinstance(n, str) for n in names)):
        raise ValueError(f"{path}: 'class_names' must list {cfg['number_class']} names (number_class), got {names!r}")
    palette = cfg.get("palette")
    if palette is not None and (len(palette) != 3 * cfg["number_class"]
                                or not all(isinstance(v, int) and 0 <= v <= 255 for v in palette)):
        raise ValueError(f"{path}: 'palette' must hold 3 x number_class = {3 * cfg['number_class']} values in 0..255")
    if cfg["upsample_mode"] != "bilinear":
        raise ValueError(f"{path}: upsample_mode {cfg['upsample_mode']!r} is not supported; use 'bilinear'")
    return cfg


def load_experiment(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"experiment config {path!r} does not exist (expected experiments/<dataset>/<method>.json)")
    return validate_experiment(read_json_object(path, "experiment settings"), path)


def experiment_suffix(cfg: dict) -> str:
    """The original's folder suffix, e.g. 50_150_250_5_6_7_8_12 (empty for backbones without steps)."""
    if not cfg["steps"]:
        return ""
    return "_".join(str(v) for v in cfg["steps"] + cfg["blocks"])


def run_dir(cfg: dict, seed: int, random_init: bool = False) -> str:
    """Where one seed's ensemble lives: <exp_dir>/<suffix>/seed_<seed>, so seeds never overwrite each other;
    baselines on a randomly initialised backbone get a random_init/ level of their own."""
    return os.path.join(cfg["exp_dir"], experiment_suffix(cfg), "random_init" if random_init else "", f"seed_{seed}")


def check_paths(cfg: dict, keys, path: str = "<config>") -> None:
    hints = {
        "model_path": "download it with checkpoints/<backbone>/download_checkpoint.sh or train one with ddpm-seg train-ddpm",
        "training_path": "download the datasets with datasets/download_datasets.sh",
        "testing_path": "download the datasets with datasets/download_datasets.sh",
    }
    if cfg.get("category") == "demo":  # the demo's data is generated, not downloaded
        hints = dict.fromkeys(hints, "run `ddpm-seg demo` first: it generates the demo dataset (and uses the DDPM "
                                     "shipped in experiments/demo/)")
    for key in keys:
        if not os.path.exists(cfg[key]):
            raise FileNotFoundError(f"{path}: {key} {cfg[key]!r} does not exist; {hints.get(key, 'check the path')}")
