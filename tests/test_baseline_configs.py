"""Every shipped experiment config of the ALAE, VDVAE, GAN and DINOv2 backbones runs `train-interpreter` end to
end, and `predict` with the trained run labels an image as the evaluation did, on narrow random-weight versions
of the paper architectures: the same resolutions, depths and block layouts, so each config's own `blocks`,
resolution and backbone keys are used as they are. Only the data, the sizes of the run, `ignore_label` (the test
scenes mark unlabelled pixels 255) and `dim[-1]` (the narrow model's feature count) are changed, and for GAN
inversion the projector's cost (2 steps, squared error instead of LPIPS, whose weights are files).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_seg.backbones import alae, create_feature_extractor, dino, gan_encoder, stylegan2, vdvae
from ddpm_seg.cli import main as cli_main
from ddpm_seg.config import validate_experiment
from scenes import write_splits
from interpreter_runs import train_interpreter

REPO = Path(__file__).resolve().parent.parent
METHODS = ("alae", "vdvae", "gan_inversion", "gan_encoder", "dinov2")
CONFIGS = sorted(str(p.relative_to(REPO)) for m in METHODS for p in REPO.glob(f"experiments/*/{m}.json"))
NARROW_W = 8
DINO_WIDTH = 16
# VDVAE with one block per stage: every resolution of the FFHQ-256 model (1 to 256), so every `blocks` entry fits.
VDVAE_ENCODER = "256x1,256d2,128x1,128d2,64x1,64d2,32x1,32d2,16x1,16d2,8x1,8d2,4x1,4d4,1x1"
VDVAE_DECODER = "1x1,4m1,4x1,8m4,8x1,16m8,16x1,32m16,32x1,64m32,64x1,128m64,128x1,256m128"


@pytest.fixture
def narrow(monkeypatch):
    """The registered builders build the paper architectures with few channels."""
    for name, arch in list(alae.ARCHITECTURES.items()):
        monkeypatch.setitem(alae.ARCHITECTURES, name, dict(arch, start_channels=4, max_channels=8, latent_size=8))
    monkeypatch.setattr(vdvae, "ARCHITECTURE", dict(vdvae.ARCHITECTURE, width=8, zdim=2, num_mixtures=1,
                                                    enc_blocks=VDVAE_ENCODER, dec_blocks=VDVAE_DECODER))
    for name, arch in list(stylegan2.ARCHITECTURES.items()):
        monkeypatch.setitem(stylegan2.ARCHITECTURES, name, dict(arch, z_dim=NARROW_W, w_dim=NARROW_W,
                                                                mapping_layers=2, channel_max=8))
    monkeypatch.setattr(gan_encoder, "ARCHITECTURE", dict(width=16, w_dim=NARROW_W))
    for archs in dino.ARCHITECTURES.values():
        for arch, spec in list(archs.items()):
            monkeypatch.setitem(archs, arch, dict(spec, embed_dim=DINO_WIDTH, num_heads=2))


def test_every_shipped_baseline_config_is_covered():
    assert len(CONFIGS) == 4 + 2 + 4 + 3 + 6  # alae, vdvae, gan_inversion, gan_encoder, dinov2


@pytest.mark.parametrize("config_path", CONFIGS)
def test_shipped_config_trains_and_evaluates_at_random_init(narrow, tmp_path, config_path):
    shipped = json.loads((REPO / config_path).read_text())  # its dim[-1] is the paper-size model's
    size = shipped["dim"][0]
    data = write_splits(tmp_path / "data", {"train": 2, "test": 2}, size=size, bar=size // 4)
    cfg = dict(shipped, exp_dir=str(tmp_path / "runs"), training_path=str(data / "train"),
               testing_path=str(data / "test"), ignore_label=255, training_number=2, testing_number=2, model_num=2)
    if cfg["model_type"] == "gan_inversion":
        cfg = {k: v for k, v in cfg.items() if not k.startswith("perceptual_")}
        cfg.update(inversion_steps=2, perceptual_loss="mse")
    if cfg["model_type"] == "dinov2":  # its config check already asks for blocks x embed_dim features
        cfg["dim"] = [size, size, len(cfg["blocks"]) * DINO_WIDTH]
    probe = create_feature_extractor(validate_experiment(cfg), {}, torch.device("cpu"), random_init=True)
    maps = probe(np.zeros((size, size, 3), np.uint8))
    cfg["dim"] = [size, size, sum(m.shape[0] for m in maps)]
    folder, metrics = train_interpreter(cfg, tmp_path / "exp.json", "--random_init", "--epochs", "1")
    assert metrics["model_type"] == shipped["model_type"] and metrics["random_init"] is True
    assert 0 <= metrics["miou"] <= 1
    prediction = np.load(folder / "predictions" / "000.npy")
    assert prediction.shape == (size, size) and prediction.max() < shipped["number_class"]
    # predict rebuilds the backbone from the run's settings: the same labels as the evaluation.
    assert cli_main(["predict", "--run_dir", str(folder), "--input", str(data / "test" / "000.png"),
                     "--out", str(tmp_path / "out"), "--device", "cpu", "--format", "npy"]) == 0
    assert np.array_equal(np.load(tmp_path / "out" / "masks" / "000.npy"), prediction)
