"""Experiment configs: the original ddpm-segmentation JSON files, loaded unchanged and validated."""

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from .backbones import BACKBONES, backbone
from .class_info import dataset_info, dataset_names
from .files import read_json_object

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
    # Diffusion backbones (ddpm, diffusers): average every map over K noise draws (default 1, the paper's).
    "noise_draws": (int, False),
    # Segment each image in V test views (default 1, the paper's): the identity, flips and quarter turns
    # (interpreter.VIEWS), each with its own noise, the members' probabilities averaged over the views.
    "test_views": (int, False),
}
# A backbone's own keys (e.g. the diffusers pipeline's prompt and dtype) are declared where it registers.
# test_views: the dihedral group of the square, 8 views; the first 4 (identity, flips, half turn) keep any shape.
MAX_TEST_VIEWS, SHAPE_KEEPING_VIEWS = 8, 4
MAX_SUFFIX = 120


def _check_int_list(path, key, value, length=None):
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{path}: {key!r} must be a list of integers, got {value!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{path}: {key!r} must have {length} entries, got {value!r}")
    if any(v < 0 for v in value):
        raise ValueError(f"{path}: {key!r} must not contain negative values, got {value!r}")


def _ascending(path, key, values):
    """Integer `values` sorted, repeats refused: the original extractor reads output blocks in index order,
    so [5, 2] and [2, 5] are the same features (and the same run folder)."""
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{path}: {key!r} lists {', '.join(repeated)} more than once ({values}); name each entry once")
    return sorted(values)


def _check_class_names(cfg, path):
    """A benchmark's class table (category) applies only to its own number of classes; a config that keeps the
    category with another number_class must bring its own class_names, which then win."""
    category = cfg.get("category")
    if category not in dataset_names() or "class_names" in cfg:
        return
    info = dataset_info(category)
    if info["number_class"] != cfg["number_class"]:
        raise ValueError(f"{path}: category {category!r} has {info['number_class']} classes but number_class is "
                         f"{cfg['number_class']}; add 'class_names' ({cfg['number_class']} names) or fix number_class")


def _check_backbone_keys(path, cfg, keys):
    """Keys that are neither the experiment's nor this backbone's: another backbone's, or unknown."""
    unknown = sorted(set(cfg) - set(keys))
    if not unknown:
        return
    owners = {key: sorted(name for name, b in BACKBONES.items() if key in b.config_keys) for key in unknown}
    for key, names in owners.items():
        if names:
            raise ValueError(f"{path}: {key!r} applies only to model_type {names}, not {cfg['model_type']!r}")
    raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys are {sorted(keys)}")


@dataclass(frozen=True)
class Experiment:
    """One experiment, validated: a field per experiment key (the optional ones at their defaults when the JSON
    leaves them out) and the backbone's own keys in backbone_options."""
    exp_dir: str
    model_type: str
    number_class: int
    ignore_label: int
    training_path: str
    testing_path: str
    model_path: str
    dim: list
    steps: list
    blocks: list
    model_num: int
    batch_size: int
    training_number: int
    testing_number: int
    upsample_mode: str
    share_noise: bool
    input_activations: bool
    category: Optional[str] = None
    validation_path: Optional[str] = None
    max_training: Optional[int] = None
    deeplab_res: Optional[int] = None
    class_names: Optional[list] = None
    palette: Optional[list] = None
    noise_draws: int = 1
    test_views: int = 1
    backbone_options: dict = field(default_factory=dict)  # the backbone's own keys the JSON gives
    given: dict = field(default_factory=dict, repr=False)  # the keys the JSON gives, steps and blocks sorted

    def to_dict(self) -> dict:
        """The experiment as its JSON gave it (steps and blocks sorted): what run folders record."""
        return copy.deepcopy(self.given)

    def replace(self, **changes) -> "Experiment":
        """A validated copy with `changes` to its keys."""
        return validate_experiment({**self.to_dict(), **changes})


def validate_experiment(cfg: dict, path: str = "<config>") -> Experiment:
    """The experiment of the JSON object `cfg` (read from `path`, named in every error); `cfg` is left unchanged."""
    cfg = copy.deepcopy(cfg)
    if not isinstance(cfg.get("model_type"), str):
        raise ValueError(f"{path}: 'model_type' must be given as a string, got {cfg.get('model_type')!r}")
    try:
        traits = backbone(cfg["model_type"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    keys = {**EXPERIMENT_KEYS, **traits.config_keys}
    _check_backbone_keys(path, cfg, keys)
    missing = sorted(k for k, (_, required) in keys.items() if required and k not in cfg)
    if missing:
        raise ValueError(f"{path}: missing required key(s) {missing}")
    for key, value in cfg.items():
        expected = keys[key][0]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"{path}: {key!r} must be of type {expected.__name__}, got {value!r}")
    _check_int_list(path, "dim", cfg["dim"], length=3)
    _check_int_list(path, "steps", cfg["steps"])
    cfg["steps"] = _ascending(path, "steps", cfg["steps"])
    if cfg["steps"] and not traits.noised:
        raise ValueError(f"{path}: 'steps' must be [] for {cfg['model_type']} (not a diffusion model: no noise steps), "
                         f"got {cfg['steps']}")
    if not traits.named_blocks:
        _check_int_list(path, "blocks", cfg["blocks"])
        cfg["blocks"] = _ascending(path, "blocks", cfg["blocks"])
    if traits.check_config is not None:
        traits.check_config(cfg, path)
    if "noise_draws" in cfg and not traits.noised:
        noised = sorted(name for name, b in BACKBONES.items() if b.noised)
        raise ValueError(f"{path}: 'noise_draws' applies only to model_type {noised}, not {cfg['model_type']!r}")
    if cfg.get("noise_draws", 1) < 1:
        raise ValueError(f"{path}: 'noise_draws' must be >= 1, got {cfg['noise_draws']}")
    views = cfg.get("test_views", 1)
    if not 1 <= views <= MAX_TEST_VIEWS:
        raise ValueError(f"{path}: 'test_views' must be in 1..{MAX_TEST_VIEWS} (flips and quarter turns), got {views}")
    if views > SHAPE_KEEPING_VIEWS and cfg["dim"][0] != cfg["dim"][1]:
        raise ValueError(f"{path}: 'test_views' {views} needs quarter turns, which a {cfg['dim'][0]}x{cfg['dim'][1]} "
                         f"resolution ('dim') does not keep; use at most {SHAPE_KEEPING_VIEWS} or a square 'dim'")
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
    _check_class_names(cfg, path)
    if cfg["upsample_mode"] != "bilinear":
        raise ValueError(f"{path}: upsample_mode {cfg['upsample_mode']!r} is not supported; use 'bilinear'")
    own = {k: copy.deepcopy(v) for k, v in cfg.items() if k in traits.config_keys}
    common = {k: copy.deepcopy(v) for k, v in cfg.items() if k in EXPERIMENT_KEYS}
    return Experiment(**common, backbone_options=own, given=cfg)


def load_experiment(path: str) -> Experiment:
    if os.path.isdir(path):
        raise ValueError(f"experiment config {path!r} is a folder; expected a JSON file such as {os.path.join(path, 'ddpm.json')}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"experiment config {path!r} does not exist (expected experiments/<dataset>/<method>.json)")
    return validate_experiment(read_json_object(path, "experiment settings"), path)


def experiment_suffix(cfg: Experiment) -> str:
    """The original's folder suffix, e.g. 50_150_250_5_6_7_8_12 (empty for backbones without steps), and
    _draws<K> when features average K noise draws, so other features never share a folder."""
    if not cfg.steps:
        return ""
    suffix = "_".join(str(v) for v in cfg.steps + cfg.blocks)
    if len(suffix) > MAX_SUFFIX:  # long module names: a folder name must stay well under 255 bytes
        digest = hashlib.sha1(json.dumps(cfg.blocks).encode()).hexdigest()[:12]
        suffix = "_".join(str(v) for v in cfg.steps) + f"_blocks-{digest}"
    return suffix + (f"_draws{cfg.noise_draws}" if cfg.noise_draws > 1 else "")


def run_dir(cfg: Experiment, seed: int, random_init: bool = False) -> str:
    """Where one seed's ensemble lives: <exp_dir>/<suffix>/seed_<seed>, so seeds never overwrite each other;
    baselines on a randomly initialised backbone get a random_init/ level of their own."""
    return os.path.join(cfg.exp_dir, experiment_suffix(cfg), "random_init" if random_init else "", f"seed_{seed}")


def check_paths(cfg: Experiment, keys, path: str = "<config>") -> None:
    hints = {
        "model_path": "download it with checkpoints/<backbone>/download_checkpoint.sh or train one with ddpm-seg train-ddpm",
        "training_path": "download the datasets with datasets/download_datasets.sh",
        "testing_path": "download the datasets with datasets/download_datasets.sh",
    }
    if cfg.category == "demo":  # the demo's data is generated, not downloaded
        hints = dict.fromkeys(hints, "run `ddpm-seg demo` first: it generates the demo dataset (and uses the DDPM "
                                     "shipped in experiments/demo/)")
    for key in keys:
        if key == "model_path" and backbone(cfg.model_type).hub_model:
            continue  # a folder or a hub id: the backbone resolves it and says what is missing
        value = getattr(cfg, key)
        if not os.path.exists(value):
            raise FileNotFoundError(f"{path}: {key} {value!r} does not exist; {hints.get(key, 'check the path')}")
