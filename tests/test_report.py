"""`ddpm-seg report` on fabricated metrics.json files: exact means, sample stds and seed counts."""

import csv
import json
import os

import numpy as np
import pytest

from ddpm_seg.commands import report

SUFFIX = "50_150_250_5_6_7_8_12"


def write_run(root, rel, miou, seed, model_type="ddpm", random_init=False, **extra):
    folder = os.path.join(root, rel, f"seed_{seed}")
    os.makedirs(folder)
    metrics = dict(miou=miou, seed=seed, model_type=model_type, category=rel.split("/")[0],
                   random_init=random_init, **extra)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f)


@pytest.fixture
def runs(tmp_path):
    root = str(tmp_path / "pixel_classifiers")
    for seed, miou in enumerate([0.40, 0.42, 0.47]):
        write_run(root, f"bedroom_28/ddpm/{SUFFIX}", miou, seed, timings={"evaluate_s": 1.0})
    write_run(root, f"ffhq_34/ddpm/{SUFFIX}", 0.57, 0)
    write_run(root, "cat_15/mae", 0.30, 0, model_type="mae")
    write_run(root, "cat_15/mae", 0.50, 1, model_type="mae")
    write_run(root, f"bedroom_28/ddpm_random/{SUFFIX}", 0.05, 0, random_init=True)
    write_run(root, f"demo/ddpm/{SUFFIX}", 0.90, 3)
    os.makedirs(os.path.join(root, "horse_21/ddpm", SUFFIX, "seed_0"))  # unfinished: no metrics.json yet
    return root


def test_markdown_laid_out_like_the_paper(runs, tmp_path):
    md_path, _ = report.write_report(runs, str(tmp_path / "out" / "report"))
    # bedroom: 40, 42, 47 -> mean 43, sample std sqrt(13) = 3.606; cat: 30, 50 -> 40 ± sqrt(200) = 14.142
    assert open(md_path).read() == (
        "mIoU (%): mean ± sample std over seeds (number of seeds)\n"
        "\n"
        "| Method | Bedroom-28 | FFHQ-34 | Cat-15 | demo |\n"
        "|:--|:--|:--|:--|:--|\n"
        "| ddpm | 43.0 ± 3.6 (3) | 57.0 (1) | -- | 90.0 (1) |\n"
        "| ddpm + random init | 5.0 (1) | -- | -- | -- |\n"
        "| mae | -- | -- | 40.0 ± 14.1 (2) | -- |\n"
    )


def test_csv_has_exact_means_and_sample_stds(runs, tmp_path):
    _, csv_path = report.write_report(runs, str(tmp_path / "report"))
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["dataset"]) for r in rows] == [
        ("ddpm", "bedroom_28"), ("ddpm", "ffhq_34"), ("ddpm", "demo"),
        ("ddpm + random init", "bedroom_28"), ("mae", "cat_15")]
    bedroom = rows[0]
    assert float(bedroom["miou_mean"]) == pytest.approx(43.0, abs=1e-4)
    assert float(bedroom["miou_std"]) == pytest.approx(np.std([40, 42, 47], ddof=1), abs=1e-4)
    assert (bedroom["n_seeds"], bedroom["seeds"]) == ("3", "0 1 2")
    assert rows[1]["miou_std"] == "" and rows[1]["n_seeds"] == "1"
    assert float(rows[4]["miou_std"]) == pytest.approx(np.std([30, 50], ddof=1), abs=1e-4)
    assert rows[4]["seeds"] == "0 1"


def test_several_configs_of_one_method_get_their_own_rows(tmp_path):
    root = str(tmp_path)
    write_run(root, f"bedroom_28/ddpm/{SUFFIX}", 0.40, 0)
    write_run(root, f"bedroom_28/ddpm/{SUFFIX}", 0.44, 1)
    write_run(root, "bedroom_28/ddpm/150_5_6", 0.30, 0)
    cells = report.summarize(report.collect_runs(root))
    assert [(c["method"], c["n"]) for c in cells] == [("ddpm (ddpm/150_5_6)", 1), (f"ddpm (ddpm/{SUFFIX})", 2)]
    assert cells[1]["mean"] == pytest.approx(42.0) and cells[1]["std"] == pytest.approx(np.std([40, 44], ddof=1))


def test_main_prints_and_writes_default_paths(runs, capsys):
    assert report.main([runs]) == 0
    out = capsys.readouterr().out
    assert "| ddpm | 43.0 ± 3.6 (3) |" in out
    assert os.path.isfile(os.path.join(runs, "report.md")) and os.path.isfile(os.path.join(runs, "report.csv"))
    assert not [n for n in os.listdir(runs) if n.endswith(".tmp")]


@pytest.mark.parametrize("change,message", [
    ({"miou": None}, "'miou' must be a number"),
    ({"miou": 47.0}, "'miou' must be a fraction in \\[0, 1\\]"),
    ({"random_init": "no"}, "'random_init' must be true or false"),
])
def test_bad_metrics_named_in_error(tmp_path, change, message):
    write_run(str(tmp_path), "cat_15/mae", 0.5, 0, model_type="mae")
    path = tmp_path / "cat_15/mae/seed_0/metrics.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **change)))
    with pytest.raises(ValueError, match=message) as error:
        report.collect_runs(str(tmp_path))
    assert str(path) in str(error.value)


def test_wrong_layout_and_empty_folder_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        report.write_report(str(tmp_path), str(tmp_path / "report"))
    write_run(str(tmp_path), "cat_15", 0.5, 0)  # no method folder between dataset and seed
    with pytest.raises(ValueError, match="expected <root>/<dataset>/<method>"):
        report.collect_runs(str(tmp_path))
