import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from ddpm_seg.config import load_experiment, run_dir, validate_experiment
from ddpm_seg.data import drop_small_classes, load_labelled_folder, resize_label

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {  # dataset: number_class, ignore_label, training_number, testing_number, checkpoint
    "bedroom_28": (29, 0, 40, 20, "lsun_bedroom"),
    "ffhq_34": (34, 255, 20, 20, "ffhq"),
    "cat_15": (15, 255, 30, 20, "lsun_cat"),
    "horse_21": (21, 255, 30, 30, "lsun_horse"),
    "celeba_19": (19, 255, 20, 500, "ffhq"),
    "ade_bedroom_30": (30, 255, 50, 650, "lsun_bedroom"),
}


@pytest.mark.parametrize("dataset", sorted(PAPER))
def test_paper_configs_hold_the_paper_values(dataset):
    cfg = load_experiment(os.path.join(ROOT, "experiments", dataset, "ddpm.json"))
    nc, ign, ntr, nte, ckpt = PAPER[dataset]
    assert (cfg.number_class, cfg.ignore_label, cfg.training_number, cfg.testing_number) == (nc, ign, ntr, nte)
    assert cfg.model_path == f"checkpoints/ddpm/{ckpt}.pt"
    assert cfg.steps == [50, 150, 250] and cfg.blocks == [5, 6, 7, 8, 12] and cfg.dim == [256, 256, 8448]
    assert cfg.model_num == 10 and cfg.batch_size == 64 and cfg.share_noise and not cfg.input_activations
    assert run_dir(cfg, 3) == f"pixel_classifiers/{dataset}/ddpm/50_150_250_5_6_7_8_12/seed_3"
    assert run_dir(cfg, 0, True) == f"pixel_classifiers/{dataset}/ddpm/50_150_250_5_6_7_8_12/random_init/seed_0"


def test_original_file_loads_unchanged(tmp_path):
    # The upstream bedroom_28/ddpm.json verbatim, including keys the code never reads.
    original = {
        "exp_dir": "pixel_classifiers/bedroom_28/ddpm", "model_type": "ddpm", "category": "bedroom_28",
        "number_class": 29, "ignore_label": 0, "training_path": "datasets/bedroom_28/real/train",
        "validation_path": "datasets/bedroom_28/ddpm", "testing_path": "datasets/bedroom_28/real/test",
        "model_path": "checkpoints/ddpm/lsun_bedroom.pt", "dim": [256, 256, 8448], "steps": [50, 150, 250],
        "blocks": [5, 6, 7, 8, 12], "model_num": 10, "batch_size": 64, "max_training": 30,
        "training_number": 40, "testing_number": 20, "upsample_mode": "bilinear", "share_noise": True,
        "input_activations": False,
    }
    path = tmp_path / "ddpm.json"
    path.write_text(json.dumps(original))
    assert load_experiment(str(path)).to_dict() == original


def _paper_cfg():
    return load_experiment(os.path.join(ROOT, "experiments", "bedroom_28", "ddpm.json")).to_dict()


def test_unknown_key_lists_valid_keys():
    cfg = dict(_paper_cfg(), stepz=[1])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\].*valid keys are .*'steps'"):
        validate_experiment(cfg, "x.json")


@pytest.mark.parametrize("key,value,message", [
    ("dim", [256, 256], "'dim' must have 3 entries"),
    ("steps", [50, -1], "'steps' must not contain negative"),
    ("blocks", ["5"], "'blocks' must be a list of integers"),
    ("share_noise", "yes", "'share_noise' must be of type bool"),
    ("model_num", 0, "'model_num' must be positive"),
])
def test_bad_values_are_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        validate_experiment(dict(_paper_cfg(), **{key: value}), "x.json")


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_experiment(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_experiment(str(bad))


def test_a_key_given_twice_is_refused_not_the_last_taken(tmp_path):
    twice = tmp_path / "twice.json"
    text = json.dumps(_paper_cfg())
    twice.write_text(text[:-1] + ', "model_num": 3}')
    with pytest.raises(ValueError, match=r"twice.json: key 'model_num' is given twice"):
        load_experiment(str(twice))
    twice.write_text(text[:-1] + ', "nested": {"a": 1, "a": 2}}')
    with pytest.raises(ValueError, match=r"twice.json: key 'a' is given twice"):
        load_experiment(str(twice))


def _write_pair(folder, stem, image, label, ext=".png"):
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image).save(os.path.join(folder, stem + ext))
    if label is not None:
        np.save(os.path.join(folder, stem + ".npy"), label)


def test_layout_sorted_recursive_first_n_and_resized(tmp_path):
    rng = np.random.default_rng(0)
    for i, sub in enumerate(["b", "a", "a/deep"]):
        label = np.full((8, 8), i, dtype=np.uint8)
        _write_pair(str(tmp_path / sub), f"img{i}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), label)
    items = load_labelled_folder(str(tmp_path), 2, (4, 4), number_class=3, ignore_label=255)
    assert [os.path.relpath(it.path, tmp_path) for it in items] == ["a/deep/img2.png", "a/img1.png"]
    assert items[0].image.shape == (4, 4, 3) and items[0].label.shape == (4, 4)
    assert (items[0].label == 2).all() and (items[1].label == 1).all()


def test_nearest_resize_matches_cv2_rule():
    label = np.arange(16).reshape(4, 4)
    # cv2.INTER_NEAREST picks floor(dst * in / out): rows/cols 0 and 2 when halving.
    assert resize_label(label, (2, 2)).tolist() == [[0, 2], [8, 10]]
    assert resize_label(np.array([[1, 2]]), (1, 4)).tolist() == [[1, 1, 2, 2]]


def test_a_small_class_and_a_stretched_image_are_said_per_file(tmp_path, capsys):
    label = np.zeros((10, 10), dtype=np.int64)
    label[0, :5] = 1
    _write_pair(str(tmp_path / "f"), "a", np.zeros((10, 10, 3), np.uint8), label)
    _write_pair(str(tmp_path / "f"), "b", np.zeros((10, 20, 3), np.uint8), np.zeros((10, 20), np.int64))
    items = load_labelled_folder(str(tmp_path / "f"), 2, (10, 10), 3, 255, drop_small=True)
    err = capsys.readouterr().err
    assert f"{tmp_path / 'f' / 'a.png'}: class 1 has 5 pixels at 10x10, fewer than 20: ignored in training" in err
    assert "1 of 2 images are not in the 10x10 shape" in err and "b.png (20x10)" in err
    assert (items[0].label[0, :5] == 255).all()


def test_small_classes_become_ignored():
    label = np.zeros((10, 10), dtype=np.int64)
    label[0, :5] = 1          # 5 pixels: dropped
    label[5:, :4] = 2         # 20 pixels: kept
    out = drop_small_classes(label, number_class=3, ignore_label=255)
    assert (out[0, :5] == 255).all() and (out[5:, :4] == 2).all() and (out == 0).sum() == 75


@pytest.mark.parametrize("case,message", [
    ("missing", r"label .*img0.npy.* does not exist"),
    ("shape", r"img0.npy.* has shape \(4, 4\) but its image .*img0.png.* is \(8, 8\)"),
    ("class", r"img0.npy.* class ids \[7\] outside 0..2"),
    ("unreadable_label", r"cannot read label .*img0.npy"),
    ("unreadable_image", r"cannot read image .*img0.png"),
])
def test_bad_inputs_name_the_file(tmp_path, case, message):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    label = np.zeros((8, 8), dtype=np.uint8)
    if case == "shape":
        label = np.zeros((4, 4), dtype=np.uint8)
    if case == "class":
        label[0, 0] = 7
    _write_pair(str(tmp_path), "img0", image, None if case == "missing" else label)
    if case == "unreadable_label":
        (tmp_path / "img0.npy").write_bytes(b"garbage")
    if case == "unreadable_image":
        (tmp_path / "img0.png").write_bytes(b"garbage")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_labelled_folder(str(tmp_path), 1, (8, 8), number_class=3, ignore_label=255)
    assert sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "*"))) == ["img0.npy", "img0.png"][
        (1 if case == "missing" else 0):]


def test_ignore_label_is_allowed_beyond_number_class(tmp_path):
    label = np.full((8, 8), 255, dtype=np.uint8)
    label[:4] = 1
    _write_pair(str(tmp_path), "img0", np.zeros((8, 8, 3), dtype=np.uint8), label)
    (item,) = load_labelled_folder(str(tmp_path), 1, (8, 8), number_class=2, ignore_label=255)
    assert set(np.unique(item.label).tolist()) == {1, 255}


def test_class_names_for_own_datasets():
    cfg = dict(_paper_cfg(), number_class=2, class_names=["sky", "sea"])
    assert validate_experiment(cfg).class_names == ["sky", "sea"]
    with pytest.raises(ValueError, match="'class_names' must list 3 names"):
        validate_experiment(dict(cfg, number_class=3), "x.json")
    assert validate_experiment(dict(cfg, palette=[0, 0, 0, 255, 255, 255])).palette[3] == 255
    with pytest.raises(ValueError, match=r"'palette' must hold 3 x number_class = 6 values in 0..255"):
        validate_experiment(dict(cfg, palette=[0, 0, 0, 256, 0, 0]), "x.json")


def test_device_names():
    import torch

    from ddpm_seg.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    for bad in ("gpu", "cudax"):
        with pytest.raises(ValueError, match="--device must be auto, cpu or cuda"):
            resolve_device(bad)
    with pytest.raises(ValueError, match=r"--device cuda:7 was requested but this machine has \d+ CUDA device"):
        resolve_device("cuda:7")


@pytest.mark.parametrize("command", ["train-interpreter", "sweep", "generate-dataset", "train-deeplab", "demo"])
def test_a_negative_seed_is_refused_naming_the_flag(command, capsys):
    from ddpm_seg.cli import main as cli_main
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--exp", "x.json", "--seed", "-1"] if command != "demo" else [command, "--seed", "-1"])
    assert exit_info.value.code == 2
    assert "argument --seed: expected an integer >= 0, got '-1'" in capsys.readouterr().err


def test_train_ddpm_refuses_a_zero_lr_and_a_negative_seed(tmp_path):
    from ddpm_seg.ddpm_training import _resolve_options, train_ddpm_defaults
    base = dict(train_ddpm_defaults(), data_dir=str(tmp_path), out_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="--lr must be a positive number, got 0"):
        _resolve_options(dict(base, lr=0.0))
    with pytest.raises(ValueError, match="--seed must be >= 0, got -2"):
        _resolve_options(dict(base, seed=-2))
