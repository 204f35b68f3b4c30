"""`ddpm-seg sweep` on the tiny experiment of conftest.py: cells equal separate single runs."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from ddpm_seg.cli import main as cli_main
from ddpm_seg.commands.sweep import parse_index_list
from ddpm_seg.sweep import CELL_H, CELL_W, cell_origin, heatmap_picture
from ddpm_seg.visualize import heatmap


def _read_csv(path):
    with open(path) as f:
        return {(int(r["step"]), int(r["block"])): r for r in csv.DictReader(f)}


def test_cells_equal_single_train_interpreter_runs(experiment, tmp_path):
    path, cfg = experiment
    out = tmp_path / "sweep"
    cli_main(["sweep", "--exp", str(path), "--device", "cpu", "--steps", "10,30", "--blocks", "2,5",
              "--members", "2", "--out", str(out)])
    rows = _read_csv(out / "sweep.csv")
    assert sorted(rows) == [(10, 2), (10, 5), (30, 2), (30, 5)]
    assert rows[10, 2]["resolution"] == "8x8" and rows[10, 5]["resolution"] == "32x32"
    assert not (out / "features").exists()

    # Two cells, one per step and block, each as its own train-interpreter run with that one map.
    for t, b in ((10, 5), (30, 2)):
        single = dict(cfg, steps=[t], blocks=[b], dim=[32, 32, int(rows[t, b]["channels"])], model_num=2)
        single_path = tmp_path / f"single_{t}_{b}.json"
        single_path.write_text(json.dumps(single))
        cli_main(["train-interpreter", "--exp", str(single_path), "--device", "cpu", "--no_pictures"])
        metrics = json.load(open(os.path.join(cfg["exp_dir"], f"{t}_{b}", "seed_0", "metrics.json")))
        # One forward per step, as a one-step run does, so the whole computation is the same: exactly equal.
        assert float(rows[t, b]["miou"]) == metrics["miou"]

    # The picture: one cell per (step, block), coloured by the shared ramp from the worst to the best cell.
    grid = np.array([[float(rows[t, b]["miou"]) for b in (2, 5)] for t in (10, 30)])
    colours = heatmap(grid - grid.min())
    picture = np.asarray(Image.open(out / "sweep.png").convert("RGB"))
    for i in range(2):
        for j in range(2):
            x, y = cell_origin(i, j)
            assert tuple(picture[y + 1, x + 1]) == tuple(colours[i, j])  # a corner, clear of the text
            cell = picture[y:y + CELL_H, x:x + CELL_W].reshape(-1, 3)
            assert len(np.unique(cell, axis=0)) > 1  # the mIoU is written in it


def test_heatmap_picture_grows_with_the_grid():
    cells = [{"step": t, "block": b, "miou": 0.1 * (i + 1)} for i, (t, b) in enumerate([(5, 0), (5, 1), (9, 0), (9, 1)])]
    small = heatmap_picture(cells, [5, 9], [0, 1])
    cells += [{"step": 20, "block": b, "miou": 0.5} for b in (0, 1)]
    taller = heatmap_picture(cells, [5, 9, 20], [0, 1])
    assert taller.size[1] - small.size[1] == CELL_H
    # Worst cell black, best white.
    x, y = cell_origin(0, 0)
    assert small.getpixel((x + 1, y + 1)) == (0, 0, 0)
    x, y = cell_origin(1, 1)
    assert small.getpixel((x + 1, y + 1)) == (255, 255, 255)


def test_parse_index_list():
    assert parse_index_list("0-3,7, 9", "--blocks") == [0, 1, 2, 3, 7, 9]
    assert parse_index_list("250,50", "--steps") == [250, 50]
    with pytest.raises(ValueError, match=r"--blocks: range '5-2' runs backwards"):
        parse_index_list("5-2", "--blocks")
    with pytest.raises(ValueError, match=r"--blocks: \[3\] listed more than once"):
        parse_index_list("0-3,3", "--blocks")
    with pytest.raises(ValueError, match=r"--steps: 'a' is not a non-negative integer"):
        parse_index_list("50,a", "--steps")


def test_bad_blocks_and_backbones_fail_before_writing(experiment, tmp_path):
    path, cfg = experiment
    out = tmp_path / "sweep"
    with pytest.raises(ValueError, match=r"blocks \[8, 9\] out of range: this UNet has output blocks 0..7"):
        cli_main(["sweep", "--exp", str(path), "--device", "cpu", "--blocks", "0-9", "--out", str(out)])
    path.write_text(json.dumps(dict(cfg, model_type="pixels", steps=[], blocks=[])))
    with pytest.raises(ValueError, match="model_type is 'pixels'"):
        cli_main(["sweep", "--exp", str(path), "--device", "cpu", "--out", str(out)])
    assert not out.exists()
