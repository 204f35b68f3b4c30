"""The demo end to end at toy sizes: data, the shipped DDPM (or a toy one trained from scratch), three
interpreters, the summary, the median picture, and the training-steps curve."""

import json
import os

import pytest
import torch
from PIL import Image

from ddpm_seg.config import load_experiment
from ddpm_seg.commands.demo import main
from ddpm_seg.demo import DDPM_TRAINING, DEMO_EXPERIMENT, SHIPPED_DDPM, SHIPPED_EMA_RATE
from ddpm_seg.demo_data import DEMO_CLASS_NAMES, DEMO_PALETTE
from guided_diffusion.checkpoint import load_ddpm, read_model_flags
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

ROWS = {"DDPM (trained here)", "DDPM at random init", "raw RGB pixels"}
# mIoU of each row of the small demo with the shipped DDPM: seeded data, noise and members, the same on every run
# (measured 0.4109, 0.1528, 0.1825). A band of 2 points around each.
SMALL_MIOU = {"DDPM (trained here)": 0.4109, "DDPM at random init": 0.1528, "raw RGB pixels": 0.1825}
BAND = 0.02


def _summary(root):
    with open(root / "pixel_classifiers" / "demo" / "demo_summary.json") as f:
        return json.load(f)


def test_demo_experiment_configs_are_consistent():
    cfg, val = load_experiment(DEMO_EXPERIMENT), load_experiment(DEMO_EXPERIMENT.replace("ddpm.json", "ddpm_val.json"))
    assert cfg.class_names == DEMO_CLASS_NAMES and cfg.number_class == len(DEMO_CLASS_NAMES)
    assert cfg.palette == DEMO_PALETTE
    # The validation config differs only in where it scores (and writes): never the test images.
    assert val.testing_path.endswith("real/val") and cfg.testing_path.endswith("real/test")
    assert {k: v for k, v in val.to_dict().items() if k not in ("testing_path", "exp_dir")} == \
           {k: v for k, v in cfg.to_dict().items() if k not in ("testing_path", "exp_dir")}


def test_missing_demo_data_points_at_the_demo_command(tmp_path):
    import pytest

    from ddpm_seg.config import check_paths

    cfg = load_experiment(DEMO_EXPERIMENT).replace(training_path=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="run `ddpm-seg demo` first") as info:
        check_paths(cfg, ["training_path"], DEMO_EXPERIMENT)
    assert "download" not in str(info.value)


def test_shipped_ddpm_loads_strictly_as_the_demo_builds_it():
    assert os.path.getsize(SHIPPED_DDPM) <= 10 * 2**20
    flags = {**model_and_diffusion_defaults(), **read_model_flags(SHIPPED_DDPM)}
    model, _ = load_ddpm(SHIPPED_DDPM, flags, torch.device("cpu"))  # weights_only=True, strict=True
    state = torch.load(SHIPPED_DDPM, map_location="cpu", weights_only=True)
    fresh, _ = create_model_and_diffusion(**flags)
    assert set(state) == set(fresh.state_dict())
    # The loaded weights are the file's, not a fresh initialisation.
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert float(SHIPPED_EMA_RATE) in [float(r) for r in DDPM_TRAINING["ema_rate"].split(",")]


def test_small_demo_with_the_shipped_ddpm(tmp_path):
    assert main(["--root", str(tmp_path), "--small", "--device", "cpu"]) == 0
    summary = _summary(tmp_path)
    results = {title: r["miou"] for title, r in summary["results"].items()}
    assert set(results) == ROWS
    assert summary["ddpm"] == SHIPPED_DDPM
    # The point of the demo: the classes are not separable by colour; the trained DDPM's features carry shape,
    # which neither raw pixels nor the same UNet at random initialisation give.
    assert results["DDPM (trained here)"] > results["raw RGB pixels"]
    assert results["DDPM (trained here)"] > results["DDPM at random init"]
    for title, miou in SMALL_MIOU.items():
        assert results[title] == pytest.approx(miou, abs=BAND), title
    trained = summary["results"]["DDPM (trained here)"]["run_dir"]
    assert len([f for f in os.listdir(os.path.join(trained, "predictions")) if f.endswith(".png")]) == 6
    # The picture: image | truth | DDPM | raw pixels, 4 panels of 128 px, of a real test image.
    picture = Image.open(summary["median_image"]["picture"])
    assert picture.width == 4 * 128 + 3 * 4
    assert os.path.isfile(tmp_path / "datasets" / "demo" / "real" / "test" / (summary["median_image"]["stem"] + ".png"))
    # A second run reuses the cached data and ensembles.
    before = os.path.getmtime(os.path.join(trained, "model_0.pth"))
    assert main(["--root", str(tmp_path), "--small", "--device", "cpu"]) == 0
    assert os.path.getmtime(os.path.join(trained, "model_0.pth")) == before


def test_small_retrain_then_curve(tmp_path):
    assert main(["--root", str(tmp_path), "--small", "--retrain", "--device", "cpu"]) == 0
    ddpm = tmp_path / "checkpoints" / "demo" / "demo_ddpm.pt"
    summary = _summary(tmp_path)
    assert summary["ddpm"] == str(ddpm) and set(summary["results"]) == ROWS
    # The demo reads the last EMA of the run, which loads strictly into the demo's UNet.
    last = tmp_path / "checkpoints" / "demo" / f"ema_{SHIPPED_EMA_RATE}_000004.pt"
    assert torch.load(ddpm, weights_only=True).keys() == torch.load(last, weights_only=True).keys()
    assert all(torch.equal(a, b) for a, b in zip(torch.load(ddpm, weights_only=True).values(),
                                                   torch.load(last, weights_only=True).values()))
    load_ddpm(str(ddpm), {**model_and_diffusion_defaults(), **read_model_flags(str(ddpm))}, torch.device("cpu"))

    assert main(["--root", str(tmp_path), "--small", "--curve", "--device", "cpu"]) == 0
    with open(tmp_path / "pixel_classifiers" / "demo" / "curve" / "curve.json") as f:
        rows = json.load(f)
    assert [r["step"] for r in rows] == [2, 4]
    # The curve's last point scores the EMA the demo used: the summary's mIoU, exactly. Four steps of training
    # leave the UNet near its random init (the random-init row scores 0.1528): measured 0.1502 and 0.1516, the
    # same on every run; a band of 2 points around each.
    assert rows[-1]["miou"] == summary["results"]["DDPM (trained here)"]["miou"]
    assert [r["miou"] for r in rows] == pytest.approx([0.1502, 0.1516], abs=BAND)
    assert all(list(r["iou"]) == DEMO_CLASS_NAMES for r in rows)
    assert Image.open(tmp_path / "pixel_classifiers" / "demo" / "curve" / "curve.png").size == (560, 320)


def test_extra_backbones_fit_the_demo_images():
    import numpy as np

    from ddpm_seg.backbones import create_feature_extractor
    from ddpm_seg.demo import baseline_configs

    cfg = load_experiment(DEMO_EXPERIMENT)
    configs = baseline_configs(cfg, ["mae", "swav", "swav_w2"])
    assert configs["pixels"].dim == [32, 32, 3]
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    for name in ("pixels", "swav", "swav_w2"):  # MAE's ViT-L is left out: 300M parameters to initialise
        run_cfg = configs[name]
        maps = create_feature_extractor(run_cfg, {}, torch.device("cpu"), random_init=True)(image)
        assert sum(m.shape[0] for m in maps) == run_cfg.dim[-1]
    assert configs["mae"].dim[-1] == 12 * 1024 and not configs["mae"].input_activations


def test_curve_scores_doubling_steps_and_the_last():
    from ddpm_seg.demo import curve_points
    from ddpm_seg.ddpm_training import doubling_step

    saved = {s: f"ema_{s}.pt" for s in range(200, 10401, 200)}
    assert list(curve_points(saved)) == [200, 400, 800, 1600, 3200, 6400, 10400]
    assert curve_points(saved)[6400] == "ema_6400.pt"
    assert list(curve_points({300: "a", 600: "b", 900: "c"})) == [300, 600, 900]
    assert list(curve_points({5: "a"})) == [5]
    assert [s for s in range(1, 2000) if doubling_step(s, 200)] == [200, 400, 800, 1600]
