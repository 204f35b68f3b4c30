"""Nothing stale, nothing stopped by one input: what is resumed or reused is keyed by the content it depends on
(checkpoint, members, training data, input files), and an unreadable input is named and left out."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_seg
from conftest import TINY, lock_held_by_a_live_process, make_experiment
from ddpm_seg.cli import main as cli_main
from ddpm_seg.ddpm_training import ImageFolderDataset
from ddpm_seg.files import LOCK_NAME
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

RUN = os.path.join("10_30_2_5", "seed_0")


def train(exp, *extra):
    return cli_main(["train-interpreter", "--exp", str(exp), "--device", "cpu", "--no_pictures", *extra])


def predict(run, inputs, out, *extra):
    return cli_main(["predict", "--run_dir", run, "--input", *map(str, inputs), "--out", str(out), "--device", "cpu",
                     *extra])


def other_checkpoint(path, seed=1):
    """Another checkpoint with the same UNet flags (other weights)."""
    torch.manual_seed(seed)
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY})
    torch.save(model.state_dict(), path)


def bomb_png(path):
    """A PNG whose header claims 20000 x 20000 pixels (Pillow refuses it as a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("stale")
    exp, cfg = make_experiment(root)
    assert train(exp) == 0
    return exp, cfg, os.path.join(cfg["exp_dir"], RUN)


def folder_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def test_a_finished_run_is_not_evaluated_on_another_checkpoint(trained, tmp_path):
    exp, cfg, run = trained
    before = folder_bytes(run), folder_bytes(os.path.join(run, "predictions"))
    ckpt = tmp_path / "other.pt"
    other_checkpoint(ckpt)
    shutil.copy(os.path.join(os.path.dirname(cfg["model_path"]), "model_flags.json"), tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**cfg, "model_path": str(ckpt)}))
    with pytest.raises(ValueError, match=r"trained on the features of a checkpoint with sha256 \w{12}, but .*other.pt "
                                         r"has \w{12}"):
        train(other)
    assert (folder_bytes(run), folder_bytes(os.path.join(run, "predictions"))) == before  # nothing overwritten
    with pytest.raises(ValueError, match="other.pt has"):
        predict(run, [cfg["testing_path"]], tmp_path / "out", "--model_path", str(ckpt))
    with pytest.raises(ValueError, match="other.pt has"):
        ddpm_seg.Interpreter.load(run, model_path=str(ckpt))
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_replaced_under_its_name_is_refused(tmp_path):
    exp, cfg = make_experiment(tmp_path)
    assert train(exp) == 0
    other_checkpoint(cfg["model_path"])
    with pytest.raises(ValueError, match="ema.pt has"):
        train(exp)
    with pytest.raises(ValueError, match="ema.pt has"):
        ddpm_seg.Interpreter.load(os.path.join(cfg["exp_dir"], RUN))


def test_a_folder_that_records_no_checkpoint_hash_is_tied_to_the_checkpoint_it_is_evaluated_with(trained, tmp_path,
                                                                                                   capsys):
    exp, cfg, run = trained
    legacy = tmp_path / "legacy"
    shutil.copytree(run, legacy)
    settings = json.loads((legacy / "settings.json").read_text())
    sha = settings.pop("model_sha256")
    (legacy / "settings.json").write_text(json.dumps(settings))
    assert train(exp, "--run_dir", str(legacy)) == 0
    assert "records no checkpoint hash" in capsys.readouterr().out
    assert json.loads((legacy / "settings.json").read_text())["model_sha256"] == sha


def test_a_stopped_run_does_not_resume_on_other_training_data(tmp_path):
    exp, cfg = make_experiment(tmp_path)
    assert train(exp) == 0
    folder = os.path.join(cfg["exp_dir"], RUN)
    os.remove(os.path.join(folder, "model_2.pth"))  # as if stopped before the last member
    label_path = os.path.join(cfg["training_path"], "001.npy")
    label = np.load(label_path)
    label[:4] = (label[:4] + 1) % 3  # the labels of one image corrected meanwhile, under the same names
    np.save(label_path, label)
    with pytest.raises(ValueError, match="training_data_sha256"):
        train(exp)
    assert not os.path.exists(os.path.join(folder, "model_2.pth"))


def test_predict_segments_again_an_input_replaced_under_its_name(trained, tmp_path):
    _, cfg, run = trained
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(os.path.join(cfg["testing_path"], "000.png"), folder / "x.png")
    out = tmp_path / "out"
    assert predict(run, [folder], out) == 0
    first = np.asarray(Image.open(out / "masks" / "x.png"))
    assert np.array_equal(first, np.load(os.path.join(run, "predictions", "000.npy")))
    shutil.copy(os.path.join(cfg["testing_path"], "001.png"), folder / "x.png")
    assert predict(run, [folder], out) == 0
    second = np.load(os.path.join(run, "predictions", "001.npy"))
    assert not np.array_equal(first, second)
    assert np.array_equal(np.asarray(Image.open(out / "masks" / "x.png")), second)


def test_a_second_predict_into_the_same_folder_is_refused(trained, tmp_path):
    _, cfg, run = trained
    out = tmp_path / "out"
    out.mkdir()
    with lock_held_by_a_live_process(out) as owner:
        with pytest.raises(ValueError, match=rf"in use by another predict run \(process {owner} on"):
            predict(run, [cfg["testing_path"]], out)
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    assert predict(run, [cfg["testing_path"]], out) == 0 and not (out / LOCK_NAME).exists()


def test_a_file_name_that_is_not_utf8_is_segmented_and_listed(trained, tmp_path):
    _, cfg, run = trained
    folder = tmp_path / "in"
    folder.mkdir()
    name = b"caf\xe9.png"  # Latin-1, not valid UTF-8
    try:
        shutil.copy(os.path.join(cfg["testing_path"], "000.png"), os.path.join(os.fsencode(folder), name))
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    out = tmp_path / "out"
    run_ = subprocess.run([sys.executable, "-c", "import sys; from ddpm_seg.cli import entry; sys.exit(entry())",
                           "predict", "--run_dir", run, "--input", str(folder), "--out", str(out), "--device", "cpu"],
                          capture_output=True)
    assert run_.returncode == 0, run_.stderr.decode(errors="replace")
    mask = os.path.join(os.fsencode(out), b"masks", name)
    assert np.array_equal(np.asarray(Image.open(mask)), np.load(os.path.join(run, "predictions", "000.npy")))
    csv = (out / "predictions.csv").read_bytes()
    assert os.path.join(os.fsencode(folder), name) in csv  # the row names the file by its own bytes


def test_an_unreadable_training_image_is_named_and_left_out(tmp_path, capsys):
    exp, cfg = make_experiment(tmp_path)
    bomb_png(tmp_path / "data" / "train" / "001.png")
    with pytest.warns(UserWarning, match=r"has 3 readable images \(1 unreadable\), fewer than the 4 requested"):
        assert train(exp) == 0
    err = capsys.readouterr().err
    assert "skipped cannot read image" in err and "001.png" in err and "exceeds limit" in err
    metrics = json.load(open(os.path.join(cfg["exp_dir"], RUN, "metrics.json")))
    assert metrics["num_test_images"] == 3


def test_train_ddpm_names_and_leaves_out_an_unreadable_image(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    bomb_png(folder / "bomb.png")
    dataset = ImageFolderDataset(str(folder), 8)
    assert [os.path.basename(p) for p in dataset.paths] == ["0.png", "1.png", "2.png"]
    assert "bomb.png" in capsys.readouterr().err
    assert torch.equal(dataset[1], torch.full((3, 8, 8), 40 / 127.5 - 1))


def test_predictions_of_an_earlier_evaluation_on_other_images_go(trained, tmp_path):
    exp, cfg, run = trained
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    (folder / "predictions" / "002.png").write_bytes(b"a picture of an earlier evaluation")
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps({**cfg, "testing_number": 2}))
    assert train(fewer, "--run_dir", str(folder)) == 0  # --no_pictures: no picture is current
    assert sorted(os.listdir(folder / "predictions")) == ["000.npy", "001.npy"]
    assert json.load(open(folder / "metrics.json"))["num_test_images"] == 2


def test_without_shared_noise_an_evaluation_again_gives_the_same_miou(tmp_path):
    """Each image's noise is a function of the run's seed and the image: evaluating the same members again
    (--eval_only, or a resumed run) reads the same features."""
    exp, cfg = make_experiment(tmp_path)
    exp.write_text(json.dumps({**cfg, "share_noise": False}))
    assert train(exp) == 0
    folder = os.path.join(cfg["exp_dir"], RUN)
    first = json.load(open(os.path.join(folder, "metrics.json")))
    assert train(exp, "--eval_only") == 0
    again = json.load(open(os.path.join(folder, "metrics.json")))
    assert again["miou"] == first["miou"] and again["uncertainty_scores"] == first["uncertainty_scores"]
