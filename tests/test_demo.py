"""The demo end to end at toy sizes: data, DDPM training, three interpreters, the summary."""

import json
import os

from ddpm_seg.config import load_experiment
from ddpm_seg.demo import DEMO_EXPERIMENT, main
from ddpm_seg.demo_data import DEMO_CLASS_NAMES, DEMO_PALETTE


def test_demo_experiment_config_is_consistent():
    cfg = load_experiment(DEMO_EXPERIMENT)
    assert cfg["class_names"] == DEMO_CLASS_NAMES and cfg["number_class"] == len(DEMO_CLASS_NAMES)
    assert cfg["palette"] == DEMO_PALETTE


def test_small_demo_runs_end_to_end(tmp_path):
    assert main(["--root", str(tmp_path), "--small", "--device", "cpu"]) == 0
    summary = json.load(open(tmp_path / "pixel_classifiers" / "demo" / "demo_summary.json"))
    results = {title: r["miou"] for title, r in summary["results"].items()}
    assert set(results) == {"DDPM (trained here)", "DDPM at random init", "raw RGB pixels"}
    # The point of the demo: the classes are not separable by colour, DDPM features carry shape.
    assert results["DDPM (trained here)"] > results["raw RGB pixels"]
    trained = summary["results"]["DDPM (trained here)"]["run_dir"]
    assert len([f for f in os.listdir(os.path.join(trained, "predictions")) if f.endswith(".png")]) == 6
    assert os.path.isfile(tmp_path / "checkpoints" / "demo" / "demo_ddpm.pt")
    # A second run reuses the cached data, DDPM and ensembles.
    before = os.path.getmtime(tmp_path / "checkpoints" / "demo" / "demo_ddpm.pt")
    assert main(["--root", str(tmp_path), "--small", "--device", "cpu"]) == 0
    assert os.path.getmtime(tmp_path / "checkpoints" / "demo" / "demo_ddpm.pt") == before


def test_extra_backbones_fit_the_demo_images():
    import numpy as np
    import torch

    from ddpm_seg.backbones import create_feature_extractor
    from ddpm_seg.config import validate_experiment
    from ddpm_seg.demo import baseline_configs

    cfg = load_experiment(DEMO_EXPERIMENT)
    configs = baseline_configs(cfg, ["mae", "swav", "swav_w2"])
    assert configs["pixels"]["dim"] == [32, 32, 3]
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    for name in ("pixels", "swav", "swav_w2"):  # MAE's ViT-L is left out: 300M parameters to initialise
        run_cfg = validate_experiment(configs[name])
        maps = create_feature_extractor(run_cfg, {}, torch.device("cpu"), random_init=True)(image)
        assert sum(m.shape[0] for m in maps) == run_cfg["dim"][-1]
    assert configs["mae"]["dim"][-1] == 12 * 1024 and not configs["mae"]["input_activations"]
