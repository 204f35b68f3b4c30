"""End to end: a tiny DDPM checkpoint and generated labelled images through `ddpm-seg train-interpreter`."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_seg.cli import main as cli_main
from ddpm_seg.ensemble import MLPEnsemble

def _run(path, *extra):
    cli_main(["train-interpreter", "--exp", str(path), "--device", "cpu", *extra])


def test_trains_evaluates_and_writes_outputs(experiment):
    path, cfg = experiment
    _run(path)
    folder = os.path.join(cfg["exp_dir"], "10_30_2_5", "seed_0")
    metrics = json.load(open(os.path.join(folder, "metrics.json")))
    # The classes are separable from local appearance, so even this tiny random UNet's features segment them.
    assert metrics["miou"] > 0.8
    assert set(metrics["iou"]) == {"class_0", "class_1", "class_2"}
    assert len(metrics["uncertainty_scores"]) == 3
    for m in range(3):
        ckpt = torch.load(os.path.join(folder, f"model_{m}.pth"), weights_only=True)
        assert "module.layers.0.weight" in ckpt["model_state_dict"]
    pred = np.load(os.path.join(folder, "predictions", "000.npy"))
    assert pred.shape == (32, 32) and pred.dtype == np.uint8
    assert Image.open(os.path.join(folder, "predictions", "000.png")).size[1] >= 32
    assert json.load(open(os.path.join(folder, "tiny.json"))) == cfg
    assert not os.path.exists(os.path.join(folder, "features"))
    # Another seed goes to its own folder and leaves this one alone.
    before = open(os.path.join(folder, "model_0.pth"), "rb").read()
    _run(path, "--seed", "1", "--no_pictures")
    assert os.path.isfile(os.path.join(cfg["exp_dir"], "10_30_2_5", "seed_1", "metrics.json"))
    assert open(os.path.join(folder, "model_0.pth"), "rb").read() == before


def test_interrupted_run_resumes_with_the_missing_members(experiment, monkeypatch):
    path, cfg = experiment
    saved = []
    original_save = MLPEnsemble.save_member

    def save_then_die(self, member_path, m):
        original_save(self, member_path, m)
        saved.append(m)
        if len(saved) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(MLPEnsemble, "save_member", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(path, "--store", "disk")
    folder = os.path.join(cfg["exp_dir"], "10_30_2_5", "seed_0")
    first = saved[0]
    assert sorted(f for f in os.listdir(folder) if f.startswith("model_") and f.endswith(".pth")) == [f"model_{first}.pth"]
    assert os.path.isdir(os.path.join(folder, "features"))  # the disk store survives for the resume
    kept = open(os.path.join(folder, f"model_{first}.pth"), "rb").read()
    _run(path, "--store", "disk")
    assert sorted(saved[1:]) == sorted(set(range(3)) - {first})
    assert open(os.path.join(folder, f"model_{first}.pth"), "rb").read() == kept
    assert os.path.isfile(os.path.join(folder, "metrics.json"))


def test_wrong_feature_size_names_the_right_number_and_writes_nothing(experiment, tmp_path):
    path, cfg = experiment
    path.write_text(json.dumps(dict(cfg, dim=[32, 32, 8448])))
    with pytest.raises(ValueError, match=r"dim\[-1\] is 8448 but steps \[10, 30\] x blocks \[2, 5\].* set dim\[-1\] to 256"):
        _run(path)
    assert not os.path.exists(cfg["exp_dir"])


def test_missing_checkpoint_points_to_download(experiment):
    path, cfg = experiment
    path.write_text(json.dumps(dict(cfg, model_path="/nonexistent/lsun_bedroom.pt")))
    with pytest.raises(FileNotFoundError, match="model_path '/nonexistent/lsun_bedroom.pt' does not exist; download"):
        _run(path)
    assert not os.path.exists(cfg["exp_dir"])


def test_seeds_and_eval_only(experiment, capsys):
    path, cfg = experiment
    _run(path, "--seeds", "0,1", "--no_pictures")
    base = os.path.join(cfg["exp_dir"], "10_30_2_5")
    scores = [json.load(open(os.path.join(base, f"seed_{s}", "metrics.json")))["miou"] for s in (0, 1)]
    assert f"mIoU over seeds [0, 1]: {np.mean(scores) * 100:.2f} ± {np.std(scores, ddof=1) * 100:.2f}" in capsys.readouterr().out
    # Evaluate the trained ensemble again without training: same predictions, same mIoU.
    os.remove(os.path.join(base, "seed_0", "metrics.json"))
    before = os.path.getmtime(os.path.join(base, "seed_0", "model_0.pth"))
    _run(path, "--eval_only", "--run_dir", os.path.join(base, "seed_0"), "--no_pictures")
    assert json.load(open(os.path.join(base, "seed_0", "metrics.json")))["miou"] == scores[0]
    assert os.path.getmtime(os.path.join(base, "seed_0", "model_0.pth")) == before
    with pytest.raises(FileNotFoundError, match=r"--eval_only: .*elsewhere lacks \['model_0.pth', 'model_1.pth', 'model_2.pth'\]"):
        _run(path, "--eval_only", "--run_dir", os.path.join(base, "elsewhere"))


def test_released_members_get_settings_and_a_finished_folder_refuses_other_features(experiment):
    import shutil

    from ddpm_seg.interpreter import Interpreter

    path, cfg = experiment
    _run(path, "--no_pictures")
    trained = os.path.join(cfg["exp_dir"], "10_30_2_5", "seed_0")
    # Members alone, as the released pixel classifiers come: evaluated with --eval_only, the folder then loads
    # in Interpreter.load (and so in predict) and segments as the evaluation did.
    released = os.path.join(cfg["exp_dir"], "released")
    os.makedirs(released)
    for m in range(3):
        shutil.copy(os.path.join(trained, f"model_{m}.pth"), released)
    _run(path, "--eval_only", "--run_dir", released, "--no_pictures")
    settings = json.load(open(os.path.join(released, "settings.json")))
    assert settings["config"]["steps"] == [10, 30] and settings["seed"] == 0 and settings["random_init"] is False
    interp = Interpreter.load(released, device="cpu")
    image = np.array(Image.open(os.path.join(cfg["testing_path"], "000.png")).convert("RGB"))
    labels, _, _ = interp(image)
    assert np.array_equal(labels, np.load(os.path.join(released, "predictions", "000.npy")))
    # The same members evaluated with other features (another seed's noise, another UNet) are refused,
    # in the trained folder and in the released one alike.
    for folder in (trained, released):
        with pytest.raises(ValueError, match=r"trained with other seed"):
            _run(path, "--eval_only", "--run_dir", folder, "--seed", "3", "--no_pictures")
    path.write_text(json.dumps(dict(cfg, share_noise=False)))
    with pytest.raises(ValueError, match=r"trained with other features .*'share_noise': True"):
        _run(path, "--run_dir", trained, "--no_pictures")


def test_console_script_reports_bad_input_in_one_line(experiment, tmp_path):
    import subprocess
    import sys

    path, cfg = experiment
    path.write_text(json.dumps(dict(cfg, stepz=[1])))
    result = subprocess.run([sys.executable, "-m", "ddpm_seg.cli", "train-interpreter", "--exp", str(path)],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 2
    assert result.stderr.startswith("ddpm-seg train-interpreter: error: ") and "unknown key(s) ['stepz']" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_refuses_other_settings(experiment):
    path, cfg = experiment
    _run(path, "--no_pictures")
    path.write_text(json.dumps(dict(cfg, training_number=3)))
    os.remove(os.path.join(cfg["exp_dir"], "10_30_2_5", "seed_0", "model_1.pth"))
    with pytest.raises(ValueError, match=r"settings.json: the files beside it were made with other settings"):
        _run(path, "--no_pictures")


def test_batch_size_and_scaled_lr_are_settings_of_the_run(experiment):
    path, cfg = experiment
    _run(path, "--no_pictures", "--batch_size", "128", "--autocast", "bf16")
    folder = os.path.join(cfg["exp_dir"], "10_30_2_5", "seed_0")
    settings = json.load(open(os.path.join(folder, "settings.json")))
    assert settings["batch_size"] == 128 and settings["lr"] == pytest.approx(1e-3 * 2 ** 0.5)
    assert settings["store_dtype"] == "bfloat16"  # --autocast bf16 stores bfloat16
    os.remove(os.path.join(folder, "model_1.pth"))
    with pytest.raises(ValueError, match="other settings"):
        _run(path, "--no_pictures", "--autocast", "bf16")  # the config's batch 64 would train member 1 another way
    with pytest.raises(ValueError, match="--batch_size must be at least 2"):
        _run(path, "--batch_size", "1")


def test_extract_dtype_is_a_setting_of_the_run(experiment):
    path, cfg = experiment
    _run(path, "--no_pictures", "--extract_dtype", "fp32", "--extract_batch", "2")
    folder = os.path.join(cfg["exp_dir"], "10_30_2_5", "seed_0")
    settings = json.load(open(os.path.join(folder, "settings.json")))
    assert settings["extract_dtype"] == "fp32"
    metrics = json.load(open(os.path.join(folder, "metrics.json")))
    assert metrics["timings"]["extract_batch"] == 2 and len(metrics["timings"]["member_steps"]) == cfg["model_num"]
    os.remove(os.path.join(folder, "model_1.pth"))
    with pytest.raises(ValueError, match="extract_dtype"):
        _run(path, "--no_pictures", "--extract_dtype", "bf16")


def test_batched_extraction_trains_the_same_members(experiment, tmp_path):
    """--extract_batch changes how many images go through one forward, not the features (fp32): the members
    trained on them and the test predictions are the same."""
    path, cfg = experiment
    folders = []
    for batch in ("1", "3"):
        folder = tmp_path / f"batch{batch}"
        _run(path, "--no_pictures", "--extract_dtype", "fp32", "--extract_batch", batch, "--run_dir", str(folder))
        folders.append(folder)
    a, b = (json.load(open(f / "metrics.json")) for f in folders)
    assert a["miou"] == pytest.approx(b["miou"], abs=1e-6)
    for m in range(cfg["model_num"]):
        sa = torch.load(folders[0] / f"model_{m}.pth", weights_only=True)["model_state_dict"]
        sb = torch.load(folders[1] / f"model_{m}.pth", weights_only=True)["model_state_dict"]
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-4, atol=1e-5)
