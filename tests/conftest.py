import contextlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The facts the checkpoint-compatibility tests compare against live beside the repo (../shared/reference).
REFERENCE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "reference")

from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults  # noqa: E402
from scenes import write_splits  # noqa: E402

from ddpm_seg.device import NATIVE_BF16_ENV

from ddpm_seg.files import LOCK_NAME

# Every "auto" precision choice follows the CPU's bf16 flags. The suite takes the float32 branch on every machine
# (here and in the commands the tests start as subprocesses); tests of the bf16 branch ask for `cpu_bf16`.
os.environ[NATIVE_BF16_ENV] = "0"


@pytest.fixture(params=["0", "1"], ids=["cpu_fp32", "cpu_bf16"])
def cpu_branch(request, monkeypatch):
    """Runs a test twice: as on a CPU without native bf16, then as on one with it (AMX, AVX512-BF16), whatever
    this machine has. Yields whether the CPU counts as having native bf16."""
    monkeypatch.setenv(NATIVE_BF16_ENV, request.param)
    yield request.param == "1"


# One intra-op thread: the tests use small tensors, and OpenMP threads that spin on a busy 2-core
# machine make small ops up to 10x slower.
torch.set_num_threads(1)


@pytest.fixture
def reference_dir():
    if not os.path.isdir(REFERENCE_DIR):
        pytest.fail(f"reference facts not found at {REFERENCE_DIR} (expected ../shared/reference beside the repo)")
    return REFERENCE_DIR


# The tiny end-to-end experiment shared by the train-interpreter and sweep tests: a small random UNet saved
# with its model_flags.json, and generated labelled images (see scenes.py).
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16", num_head_channels=16,
            learn_sigma=True, diffusion_steps=100)


def make_experiment(tmp_path):
    """The tiny experiment under tmp_path: (config path, config dict)."""
    write_splits(tmp_path / "data", {"train": 4, "test": 3}, size=32, bar=4)
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY})
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(model.state_dict(), ckpt / "ema.pt")
    (ckpt / "model_flags.json").write_text(json.dumps(TINY))
    cfg = {
        "exp_dir": str(tmp_path / "runs"), "model_type": "ddpm", "category": "tiny", "number_class": 3,
        "ignore_label": 255, "training_path": str(tmp_path / "data/train"),
        "testing_path": str(tmp_path / "data/test"), "model_path": str(ckpt / "ema.pt"),
        "dim": [32, 32, 256], "steps": [10, 30], "blocks": [2, 5], "model_num": 3, "batch_size": 64,
        "training_number": 4, "testing_number": 3, "upsample_mode": "bilinear", "share_noise": True,
        "input_activations": False,
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path, cfg


@pytest.fixture
def experiment(tmp_path):
    return make_experiment(tmp_path)


@contextlib.contextmanager
def lock_held_by_a_live_process(folder):
    """A lock file in `folder` naming a live process on this host (as a running job leaves it); the process
    ends on exit, leaving the lock stale. Yields the owner's pid."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / LOCK_NAME).write_text(f"{owner.pid} {socket.gethostname()}\n")
        yield owner.pid
    finally:
        owner.kill()
        owner.wait()
