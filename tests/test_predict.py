"""`ddpm-seg predict` and the Interpreter: new images of any size and mode, the same labels as the evaluation,
what to label next, DeepLab, PNG masks as training labels, and the README's Python example."""

import csv
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ddpm_seg
from conftest import make_experiment
from ddpm_seg import interpreter as interpreter_module
from ddpm_seg.backbones import image_tensor
from ddpm_seg.class_info import default_palette
from ddpm_seg.cli import entry as cli_entry
from ddpm_seg.cli import main as cli_main
from ddpm_seg.data import read_image
from ddpm_seg.deeplab import build_deeplab
from ddpm_seg.interpreter import upsample_rows
from test_images import exif_rotated_jpeg, png16, write_masks

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny experiment trained once: (config path, config, run folder)."""
    root = tmp_path_factory.mktemp("trained")
    exp, cfg = make_experiment(root)
    # One training image without its ignored pixel, so that a colour mask (which has no colour for
    # ignore_label) can label it exactly in test_png_masks_train_to_the_same_ensemble.
    label = np.load(root / "data/train/002.npy")
    label[0, 0] = label[0, 1]
    np.save(root / "data/train/002.npy", label)
    cli_main(["train-interpreter", "--exp", str(exp), "--device", "cpu"])
    return exp, cfg, os.path.join(cfg["exp_dir"], "10_30_2_5", "seed_0")


def predict(run_dir, inputs, out, *extra):
    return cli_main(["predict", "--run_dir", run_dir, "--input", *map(str, inputs), "--out", str(out),
                     "--device", "cpu", *extra])


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_labels_on_the_test_images_equal_the_evaluation(trained, tmp_path):
    _, cfg, run = trained
    assert predict(run, [cfg["testing_path"]], tmp_path, "--format", "both", "--batch_size", "2") == 0
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    rows = read_csv(tmp_path / "predictions.csv")
    assert [os.path.basename(r["image"]) for r in rows] == ["000.png", "001.png", "002.png"]
    for i, row in enumerate(rows):
        evaluated = np.load(os.path.join(run, "predictions", f"{i:03d}.npy"))
        assert np.array_equal(np.load(tmp_path / "masks" / f"{i:03d}.npy"), evaluated)
        mask = Image.open(tmp_path / "masks" / f"{i:03d}.png")
        assert mask.mode == "P" and np.array_equal(np.asarray(mask), evaluated)
        assert np.array_equal(np.array(mask.getpalette()[:9]).reshape(3, 3), default_palette(3))
        assert float(row["uncertainty_score"]) == pytest.approx(metrics["uncertainty_scores"][i], rel=1e-6)
        shares = np.bincount(evaluated.ravel(), minlength=3) / evaluated.size
        assert np.allclose([float(row[f"class_{c}"]) for c in range(3)], shares, atol=1e-6)
        assert Image.open(tmp_path / "overlays" / f"{i:03d}.png").width >= 32


def test_a_folder_of_mixed_sizes_and_modes_gives_one_mask_per_image_at_its_size(trained, tmp_path, capsys):
    _, cfg, run = trained
    photo = read_image(os.path.join(cfg["testing_path"], "000.png"))
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(photo).resize((80, 50)).save(folder / "wide.png")
    Image.fromarray(photo).convert("L").resize((40, 40)).save(folder / "grey.jpg")
    Image.fromarray(np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])).resize((20, 36)).save(folder / "rgba.png")
    png16(folder / "deep.png", photo[:24, :24, 0].astype(np.uint16) * 257)
    Image.fromarray(photo).quantize(32).save(folder / "sub" / "paletted.png")
    exif_rotated_jpeg(folder / "sub" / "turned.jpg", np.asarray(Image.fromarray(photo).resize((30, 20))))
    (folder / "._wide.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork: skipped, not an error
    Image.fromarray(photo).save(folder / ".hidden.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    assert predict(run, [folder], out, "--uncertainty") == 1  # the broken input fails the run, at the end
    captured = capsys.readouterr()
    assert "broken.png" in captured.out + captured.err
    expected = {"wide": (50, 80), "grey": (40, 40), "rgba": (36, 20), "deep": (24, 24),
                os.path.join("sub", "paletted"): (32, 32), os.path.join("sub", "turned"): (20, 30)}
    rows = read_csv(out / "predictions.csv")
    assert sorted(os.path.relpath(r["image"], folder) for r in rows) == sorted(
        ["wide.png", "grey.jpg", "rgba.png", "deep.png", "sub/paletted.png", "sub/turned.jpg"])
    for stem, size in expected.items():
        mask = Image.open(out / "masks" / f"{stem}.png")
        assert mask.mode == "P" and mask.size == (size[1], size[0])
        assert np.asarray(mask).max() < 3
        assert np.load(out / "uncertainty" / f"{stem}.npy").shape == size
        assert Image.open(out / "overlays" / f"{stem}.png").width >= size[1]
    for row in rows:
        assert sum(float(row[f"class_{c}"]) for c in range(3)) == pytest.approx(1, abs=1e-5)
        assert (int(row["height"]), int(row["width"])) == expected[os.path.splitext(os.path.relpath(row["image"], folder))[0]]
    written = sorted(str(p.relative_to(out)) for p in out.glob("**/*") if p.is_file())
    assert [p for p in written if "wide" in p or "hidden" in p or "broken" in p] == [
        "masks/wide.png", "overlays/wide.png", "uncertainty/wide.npy", "uncertainty/wide.png"]


def test_suggest_lists_the_most_uncertain_first(trained, tmp_path):
    _, cfg, run = trained
    assert predict(run, [os.path.join(os.path.dirname(cfg["training_path"]), "*", "*.png")], tmp_path,
                   "--suggest", "4", "--no_overlay") == 0
    rows = read_csv(tmp_path / "predictions.csv")
    assert len(rows) == 7 and not (tmp_path / "overlays").exists()
    assert (tmp_path / "masks" / "train" / "000.png").is_file()  # a glob's matches keep their path below its base
    by_score = sorted(rows, key=lambda r: -float(r["uncertainty_score"]))
    assert (tmp_path / "suggest.txt").read_text().splitlines() == [r["image"] for r in by_score[:4]]
    assert Image.open(tmp_path / "suggest.png").height > 4 * 128
    # An input inside --out could be overwritten by its own mask (masks/train/000.png here): refused.
    with pytest.raises(ValueError, match="lies inside --out"):
        predict(run, [tmp_path / "masks" / "train" / "000.png"], tmp_path / "masks")


def test_a_stopped_predict_resumes_with_the_images_not_yet_written(trained, tmp_path, monkeypatch):
    _, cfg, run = trained
    inputs = [os.path.join(os.path.dirname(cfg["training_path"]), "*", "*.png")]
    assert predict(run, inputs, tmp_path / "whole", "--suggest", "3", "--uncertainty") == 0
    segmented, stop_at = [], [4]
    original = interpreter_module.Interpreter.segment

    def segment_then_stop(self, images):
        if len(segmented) == stop_at[0]:
            raise KeyboardInterrupt
        segmented.extend(images)
        return original(self, images)

    monkeypatch.setattr(interpreter_module.Interpreter, "segment", segment_then_stop)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        predict(run, inputs, out, "--suggest", "3", "--uncertainty")
    assert len(segmented) == 4
    stop_at[0] = None
    # The rerun segments only the 3 images the stopped run did not write (and one whose outputs were deleted).
    os.remove(out / "overlays" / "test" / "001.png")
    segmented.clear()
    assert predict(run, inputs, out, "--suggest", "3", "--uncertainty") == 0
    assert len(segmented) == 4
    assert read_csv(out / "predictions.csv") == read_csv(tmp_path / "whole" / "predictions.csv")
    assert (out / "suggest.txt").read_text() == (tmp_path / "whole" / "suggest.txt").read_text()
    for mask in (tmp_path / "whole").glob("**/*.png"):
        assert np.array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(out / mask.relative_to(tmp_path / "whole"))))
    # Done: nothing is segmented again; other output options (or another model) start afresh.
    segmented.clear()
    assert predict(run, inputs, out, "--suggest", "3", "--uncertainty") == 0
    assert segmented == []
    assert predict(run, inputs, out, "--suggest", "3") == 0
    assert len(segmented) == 7


def test_large_images_are_voted_band_by_band_as_one_upsampling(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7, 9)
    full = F.interpolate(logits, size=(50, 33), mode="bilinear", align_corners=False)
    bands = torch.cat([upsample_rows(logits, (50, 33), s, min(50, s + 7)) for s in range(0, 50, 7)], dim=2)
    assert torch.allclose(bands, full, atol=1e-6)
    whole = interpreter_module.segment_logits(logits, (50, 33))
    monkeypatch.setattr(interpreter_module, "BAND_VALUES", 3 * 4 * 33 * 2)  # two rows per band
    banded = interpreter_module.segment_logits(logits, (50, 33))
    assert np.array_equal(whole[0], banded[0])
    # Float rounding may differ with the band's shape (vectorised exp), not more.
    assert np.allclose(whole[1], banded[1], rtol=1e-5, atol=1e-7) and whole[2] == pytest.approx(banded[2], rel=1e-5)


def test_a_copied_run_folder_loads_with_model_path(trained, tmp_path):
    _, cfg, run = trained
    copy = tmp_path / "seed_0"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("predictions"))
    moved = tmp_path / "ema.pt"
    shutil.copyfile(cfg["model_path"], moved)
    settings = json.load(open(copy / "settings.json"))
    settings["config"]["model_path"] = str(tmp_path / "elsewhere" / "ema.pt")
    (copy / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(FileNotFoundError, match="does not exist here; pass its path"):
        ddpm_seg.Interpreter.load(str(copy))
    interp = ddpm_seg.Interpreter.load(str(copy), model_path=str(moved), device="cpu")
    image = Image.open(os.path.join(cfg["testing_path"], "001.png"))
    labels, uncertainty, score = interp(image)
    assert np.array_equal(labels, np.load(os.path.join(run, "predictions", "001.npy")))
    assert uncertainty.shape == (32, 32) and score >= 0
    # The batched form gives each image's own result.
    batch = interp.segment([image, np.asarray(image.convert("RGB"))[:20]])
    assert np.array_equal(batch[0][0], labels) and batch[1][0].shape == (20, 32)
    with pytest.raises(FileNotFoundError, match="not a train-interpreter run folder"):
        ddpm_seg.Interpreter.load(str(tmp_path))


def test_deeplab_predict(experiment, tmp_path):
    exp, cfg = experiment
    torch.manual_seed(0)
    model = build_deeplab("resnet50", 3).eval()
    folder = tmp_path / "deeplab"
    folder.mkdir()
    torch.save({"model_state_dict": model.state_dict()}, folder / "deeplab_best.pth")
    (folder / "experiment.json").write_text(json.dumps({**cfg, "deeplab_res": 32}))
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.fromarray(read_image(os.path.join(cfg["testing_path"], "000.png"))).resize((48, 40)).save(extra / "big.png")
    out = tmp_path / "out"
    assert cli_main(["predict", "--deeplab", str(folder / "deeplab_best.pth"), "--input", cfg["testing_path"],
                     str(extra / "big.png"), "--out", str(out), "--device", "cpu", "--suggest", "2"]) == 0
    for i in range(3):
        image = read_image(os.path.join(cfg["testing_path"], f"{i:03d}.png"))
        with torch.no_grad():
            expected = model(image_tensor(image, "cpu", "imagenet"))["out"].argmax(1)[0].numpy()
        assert np.array_equal(np.asarray(Image.open(out / "masks" / f"{i:03d}.png")), expected)
    assert Image.open(out / "masks" / "big.png").size == (48, 40)
    assert len((out / "suggest.txt").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="predicts 3 classes but"):
        (folder / "experiment.json").write_text(json.dumps({**cfg, "number_class": 4, "deeplab_res": 32}))
        cli_main(["predict", "--deeplab", str(folder / "deeplab_best.pth"), "--input", cfg["testing_path"],
                  "--out", str(out), "--device", "cpu"])


def test_png_masks_train_to_the_same_ensemble(trained, tmp_path):
    """Labels as PNG masks of all three kinds (ids, palette indices, colours) give the .npy run's mIoU."""
    exp, cfg, run = trained
    masked = {}
    for split, key in (("train", "training_path"), ("test", "testing_path")):
        folder = tmp_path / split
        folder.mkdir()
        for image in sorted(os.listdir(cfg[key])):
            if image.endswith(".png"):
                shutil.copyfile(os.path.join(cfg[key], image), folder / image)
        labels = {s: np.load(os.path.join(cfg[key], f"{s}.npy")) for s in ("000", "001", "002")}
        write_masks(folder, {"000": labels["000"]}, "ids")
        write_masks(folder, {"001": labels["001"]}, "palette")
        if split == "train":
            write_masks(folder, {"002": labels["002"]}, "colour", default_palette(3))
            write_masks(folder, {"003": np.load(os.path.join(cfg[key], "003.npy"))}, "ids")
        else:
            write_masks(folder, {"002": labels["002"]}, "palette")
        masked[key] = str(folder)
    path = tmp_path / "masked.json"
    path.write_text(json.dumps({**cfg, **masked, "exp_dir": str(tmp_path / "runs")}))
    cli_main(["train-interpreter", "--exp", str(path), "--device", "cpu", "--no_pictures"])
    ours = json.load(open(tmp_path / "runs" / "10_30_2_5" / "seed_0" / "metrics.json"))
    assert ours["miou"] == json.load(open(os.path.join(run, "metrics.json")))["miou"]


def test_readme_python_example_runs_as_written(trained, tmp_path, monkeypatch):
    _, cfg, run = trained
    text = open(README).read()
    code = re.search(r"<!-- tested by tests/test_predict.py -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    run_path = re.search(r'Interpreter\.load\("([^"]+)"\)', code).group(1)
    photo = re.search(r'Image\.open\("([^"]+)"\)', code).group(1)
    os.makedirs(os.path.dirname(tmp_path / run_path), exist_ok=True)
    shutil.copytree(run, tmp_path / run_path)
    Image.open(os.path.join(cfg["testing_path"], "002.png")).resize((40, 30)).save(tmp_path / photo)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    mask = np.asarray(Image.open(tmp_path / "photo_mask.png"))
    assert mask.shape == (30, 40, 3)
    assert {tuple(c) for c in mask.reshape(-1, 3)} <= {tuple(c) for c in default_palette(3)}


def test_no_input_name_makes_one_output_overwrite_another(trained, tmp_path):
    """Inputs named like another input's outputs or like the run's own files each get their own outputs."""
    _, cfg, run = trained
    folder = tmp_path / "in"
    folder.mkdir()
    sources = {"x.png": "000", "x_overlay.png": "001", "suggest.png": "002", "x_uncertainty.png": "000",
               "predictions.png": "001", "masks.png": "002"}
    for name, source in sources.items():
        shutil.copy(os.path.join(cfg["testing_path"], f"{source}.png"), folder / name)
    out = tmp_path / "out"
    assert predict(run, [folder], out, "--uncertainty", "--suggest", "2", "--format", "both") == 0
    for name, source in sources.items():
        evaluated = np.load(os.path.join(run, "predictions", f"{source}.npy"))
        stem = os.path.splitext(name)[0]
        assert np.array_equal(np.asarray(Image.open(out / "masks" / f"{stem}.png")), evaluated), name
        assert np.array_equal(np.load(out / "masks" / f"{stem}.npy"), evaluated), name
        assert np.load(out / "uncertainty" / f"{stem}.npy").shape == evaluated.shape
        assert (out / "overlays" / f"{stem}.png").is_file()
    assert len(read_csv(out / "predictions.csv")) == len(sources)
    assert len((out / "suggest.txt").read_text().splitlines()) == 2


def test_two_inputs_with_one_output_name_are_refused_before_anything_is_written(trained, tmp_path):
    _, cfg, run = trained
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(os.path.join(cfg["testing_path"], "000.png"), folder / "x.png")
    Image.open(os.path.join(cfg["testing_path"], "001.png")).save(folder / "x.jpg")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"would both be written as masks/x\.png"):
        predict(run, [folder], out)
    assert not out.exists()


def test_a_glob_that_matches_nothing_is_an_error_even_beside_other_inputs(trained, tmp_path):
    _, cfg, run = trained
    with pytest.raises(FileNotFoundError, match=r"'[^']*\*\.jpeg': the glob matches no image"):
        predict(run, [os.path.join(cfg["testing_path"], "000.png"), str(tmp_path / "*.jpeg")], tmp_path / "out")


def test_an_out_that_is_an_existing_file_is_one_clear_line(trained, tmp_path, capsys, monkeypatch):
    _, cfg, run = trained
    (tmp_path / "taken").write_text("not a folder")
    monkeypatch.setattr(sys, "argv", ["ddpm-seg", "predict", "--run_dir", run, "--input", cfg["testing_path"],
                                      "--out", str(tmp_path / "taken"), "--device", "cpu"])
    code = cli_entry()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Errno" not in err[0]
    assert err[0].endswith(f"{tmp_path / 'taken'} is an existing file, not a folder; choose another output folder")
    assert (tmp_path / "taken").read_text() == "not a folder"
