"""One answer per image: the evaluation, predict (one image per forward or several), the Python API and a
machine with the other kind of CPU all give an image the same labels, on both branches of the CPU's
precision choice."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_experiment
from ddpm_seg.backbones import extract_dtype
from ddpm_seg.cli import main as cli_main
from ddpm_seg.interpreter import Interpreter
from ddpm_seg.training import resolve_autocast, store_dtype_name
from ddpm_seg.device import NATIVE_BF16_ENV, cpu_has_native_bf16


def test_every_path_gives_the_labels_the_evaluation_wrote(tmp_path, cpu_branch, monkeypatch):
    exp, cfg = make_experiment(tmp_path)
    assert cli_main(["train-interpreter", "--exp", str(exp), "--device", "cpu", "--no_pictures"]) == 0
    run = os.path.join(cfg["exp_dir"], "10_30_2_5", "seed_0")
    settings = json.load(open(os.path.join(run, "settings.json")))
    assert settings["extract_dtype"] == ("bf16" if cpu_branch else "fp32")
    assert settings["autocast"] == ("bf16" if cpu_branch else "none")
    names = sorted(os.listdir(cfg["testing_path"]))
    images = [os.path.join(cfg["testing_path"], n) for n in names if n.endswith(".png")]
    evaluated = [np.load(os.path.join(run, "predictions", os.path.basename(p)[:-4] + ".npy")) for p in images]
    assert len(images) == 3 and len({e.tobytes() for e in evaluated}) == 3

    for batch in ("1", "3"):
        out = tmp_path / f"predict_{batch}"
        assert cli_main(["predict", "--run_dir", run, "--input", *images, "--out", str(out), "--device", "cpu",
                         "--format", "npy", "--no_overlay", "--batch_size", batch]) == 0
        for path, labels in zip(images, evaluated):
            assert np.array_equal(np.load(out / "masks" / (os.path.basename(path)[:-4] + ".npy")), labels)

    interpreter = Interpreter.load(run, device="cpu")
    for (labels, _, _), expected in zip(interpreter.segment([Image.open(p) for p in images]), evaluated):
        assert np.array_equal(labels, expected)

    # The same run folder on a machine whose CPU chooses the other way still reads in the run's precision.
    monkeypatch.setenv(NATIVE_BF16_ENV, "0" if cpu_branch else "1")
    other_machine = Interpreter.load(run, device="cpu")
    assert other_machine.extractor.model.dtype == (torch.bfloat16 if cpu_branch else torch.float32)
    for (labels, _, _), expected in zip(other_machine.segment([Image.open(p) for p in images]), evaluated):
        assert np.array_equal(labels, expected)


def test_auto_choices_follow_the_cpu(cpu_branch):
    cpu = torch.device("cpu")
    assert cpu_has_native_bf16() == cpu_branch
    assert extract_dtype("auto", cpu) == (torch.bfloat16 if cpu_branch else torch.float32)
    assert resolve_autocast("auto", cpu) == ("bf16" if cpu_branch else "none")
    assert resolve_autocast("none", cpu) == "none" and resolve_autocast("bf16", cpu) == "bf16"


def test_store_dtype_auto_follows_autocast():
    assert store_dtype_name("auto", "bf16") == "bfloat16"
    assert store_dtype_name("auto", "none") == "float16"
    assert store_dtype_name("float32", "bf16") == "float32"


def test_the_cpu_override_is_checked(monkeypatch):
    monkeypatch.setenv(NATIVE_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=NATIVE_BF16_ENV):
        cpu_has_native_bf16()
    monkeypatch.delenv(NATIVE_BF16_ENV)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert cpu_has_native_bf16() == any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def test_store_auto_goes_to_disk_only_when_the_features_take_over_half_the_free_memory(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ddpm_seg import training
    items = [SimpleNamespace(image=np.zeros((16, 16, 3), np.uint8), label=np.zeros((16, 16), np.uint8))] * 2
    maps = [torch.ones(1, 4, 8, 8)]
    features = 2 * 4 * 8 * 8 * 2  # bytes of both images' float16 maps
    for free, on_disk in ((2 * features + 2, False), (2 * features - 2, True)):
        monkeypatch.setattr(training, "available_memory_bytes", lambda *a, free=free: free)
        root = tmp_path / f"store_{free}"
        store = training.extract_training_store(lambda images, view=0: maps, items, [maps[0][0]], str(root), "auto",
                                                torch.float16)
        assert (store.root is not None) == on_disk and os.path.isdir(root) == on_disk
