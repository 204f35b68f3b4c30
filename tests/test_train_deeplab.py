"""train-deeplab: the synthetic .npz formats, the uncertainty filter, and a tiny DeepLabV3 run that resumes."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

import ddpm_seg.deeplab_training as td
from ddpm_seg.backbones import image_tensor
from ddpm_seg.commands import train_deeplab as train_deeplab_command
from ddpm_seg.commands.flags import options_from_flags
from ddpm_seg.config import load_experiment
from ddpm_seg.data import load_labelled_folder
from ddpm_seg.evaluate import ConfusionMatrix
from ddpm_seg.synthetic_data import save_npz

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scene(rng, size=32):
    """A bright square (class 1) and a dark bar (class 2) on a grey background (class 0)."""
    image = np.full((size, size, 3), 120, dtype=np.uint8) + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
    label = np.zeros((size, size), dtype=np.uint8)
    y, x = rng.integers(2, size // 2, 2)
    image[y:y + 10, x:x + 10] = 230
    label[y:y + 10, x:x + 10] = 1
    col = rng.integers(0, size - 4)
    image[:, col:col + 4] = 20
    label[:, col:col + 4] = 2
    label[0, 0] = 255  # an ignored pixel
    return image, label


def test_filter_drops_the_most_uncertain_share():
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])
    assert td.filter_indices(scores, 0.2).tolist() == [0, 1, 3, 4, 5, 7, 8, 9]  # 0.9 and 0.8 go
    assert td.filter_indices(scores, 0.0).tolist() == list(range(10))
    # The original's window shifted by 1: the most certain (0.0) and the most uncertain (0.9) go.
    assert td.filter_indices(scores, 0.2, drop_most_certain=1).tolist() == [0, 1, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="drop_most_certain"):
        td.filter_indices(scores, 0.2, drop_most_certain=3)
    with pytest.raises(ValueError, match="uncertainty_portion"):
        td.filter_indices(scores, 1.0)


def test_filter_with_30_matches_the_original_slice():
    scores = np.random.default_rng(0).random(1000)
    order = np.argsort(scores)
    original = order[30:-int(len(order) * 0.1) + 30]  # train_deeplab.py's idxs[30: -filter_out_num + 30]
    assert np.array_equal(td.filter_indices(scores, 0.1, drop_most_certain=30), np.sort(original))


def test_loads_datasetddpm_and_datasetgan_files(tmp_path):
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    labels = np.ones((3, 8, 8), dtype=np.uint8)
    scores = np.array([0.3, 0.1, 0.2], dtype=np.float32)
    save_npz(str(tmp_path / "ddpm.npz"), images, labels, scores)
    save_npz(str(tmp_path / "gan.npz"), images, labels, np.zeros((3, 512)), scores)
    for name in ("ddpm.npz", "gan.npz"):
        got = td.load_synthetic(str(tmp_path / name))
        assert np.array_equal(got[0], images) and np.array_equal(got[1], labels) and np.array_equal(got[2], scores)
    save_npz(str(tmp_path / "bad.npz"), images, labels)
    with pytest.raises(ValueError, match="arr_0..arr_2"):
        td.load_synthetic(str(tmp_path / "bad.npz"))
    save_npz(str(tmp_path / "short.npz"), images, labels, scores[:2])
    with pytest.raises(ValueError, match="uncertainty scores"):
        td.load_synthetic(str(tmp_path / "short.npz"))
    with pytest.raises(FileNotFoundError, match="generate-dataset"):
        td.load_synthetic(str(tmp_path / "none.npz"))


@pytest.fixture
def experiment(tmp_path):
    rng = np.random.default_rng(0)
    scenes = [_scene(rng) for _ in range(10)]
    # Sample 3 is the most uncertain: the default filter (int(10 * 0.1) = 1 sample) leaves it out.
    scores = np.linspace(0.1, 0.2, 10).astype(np.float32)
    scores[3] = 0.9
    save_npz(str(tmp_path / "samples_32x32x3.npz"), np.stack([s[0] for s in scenes]),
             np.stack([s[1] for s in scenes]), scores)
    for split, n in (("val", 2), ("test", 3)):
        (tmp_path / split).mkdir()
        for i in range(n):
            image, label = _scene(rng)
            Image.fromarray(image).save(tmp_path / split / f"{i}.png")
            np.save(tmp_path / split / f"{i}.npy", label)
    cfg = {
        "exp_dir": str(tmp_path / "runs"), "model_type": "ddpm", "category": "tiny", "number_class": 3,
        "ignore_label": 255, "training_path": str(tmp_path), "validation_path": str(tmp_path / "val"),
        "testing_path": str(tmp_path / "test"), "model_path": str(tmp_path / "none.pt"), "dim": [32, 32, 8],
        "steps": [50], "blocks": [5], "model_num": 2, "batch_size": 64, "training_number": 1,
        "testing_number": 3, "deeplab_res": 32, "upsample_mode": "bilinear", "share_noise": True,
        "input_activations": False,
    }
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    return str(tmp_path / "tiny.json"), cfg


def _train(exp, data, out_dir, epochs):
    argv = ["--exp", exp, "--data_path", data, "--out_dir", str(out_dir), "--backbone", "resnet50",
            "--batch_size", "3", "--num_epoch", str(epochs), "--num_workers", "0", "--device", "cpu"]
    parser = argparse.ArgumentParser()
    train_deeplab_command.add_args(parser)
    options = options_from_flags(td.DeepLabOptions, parser.parse_args(argv))
    return td.train_deeplab(load_experiment(exp), exp, options)


def miou_on_test_images(model, cfg):
    """The shared metric's mIoU of `model` on the experiment's 3 test images."""
    model.eval()
    matrix = ConfusionMatrix(3, 255)
    with torch.no_grad():
        for item in load_labelled_folder(cfg["testing_path"], 3, (32, 32), 3, 255):
            matrix.update(model(image_tensor(item.image, "cpu", "imagenet"))["out"].argmax(1)[0], item.label)
    return matrix.miou()


def test_trains_resumes_and_reports_miou(experiment, tmp_path):
    exp, cfg = experiment
    data = str(tmp_path / "samples_32x32x3.npz")
    straight = _train(exp, data, tmp_path / "straight", 2)
    first = _train(exp, data, tmp_path / "resumed", 1)
    resumed = _train(exp, data, tmp_path / "resumed", 2)
    assert first["num_train_samples"] == 9 and len(first["val_history"]) == 1
    assert len(resumed["val_history"]) == 2 and resumed["val_history"][0] == first["val_history"][0]

    # Resuming after epoch 0 trains epoch 1 exactly as the uninterrupted run does.
    a = torch.load(tmp_path / "straight" / "deeplab_last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "deeplab_last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    assert resumed == straight

    # The reported mIoU is the best validation epoch's checkpoint scored on the test images by the shared metric.
    assert straight["val_history"][straight["best_epoch"]] == max(straight["val_history"]) == straight["val_miou"]
    model = td.build_deeplab("resnet50", 3)
    model.load_state_dict(torch.load(tmp_path / "straight" / "deeplab_best.pth", weights_only=True)["model_state_dict"])
    assert straight["miou"] == pytest.approx(miou_on_test_images(model, cfg), abs=1e-12)
    with open(tmp_path / "straight" / "metrics.json") as f:
        assert json.load(f)["miou"] == straight["miou"]


def test_bad_labels_and_changed_settings_are_refused(experiment, tmp_path):
    exp, _ = experiment
    with np.load(tmp_path / "samples_32x32x3.npz") as npz:
        images, labels, scores = npz["arr_0"], npz["arr_1"].copy(), npz["arr_2"]
    labels[0, 5, 5] = 7
    save_npz(str(tmp_path / "bad.npz"), images, labels, scores)
    with pytest.raises(ValueError, match=r"class ids \[7\]"):
        _train(exp, str(tmp_path / "bad.npz"), tmp_path / "bad", 1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "settings.json").write_text(json.dumps({"learning_rate": 0.5}))
    with pytest.raises(ValueError, match="learning_rate"):
        _train(exp, str(tmp_path / "samples_32x32x3.npz"), tmp_path / "run", 1)


def test_a_dataset_regenerated_under_its_name_is_not_resumed_on(experiment, tmp_path):
    exp, _ = experiment
    data = tmp_path / "samples_32x32x3.npz"
    _train(exp, str(data), tmp_path / "run", 1)
    with np.load(data) as npz:
        images, labels, scores = npz["arr_0"], npz["arr_1"], npz["arr_2"]
    save_npz(str(data), images[::-1].copy(), labels[::-1].copy(), scores[::-1].copy())  # other samples, same name
    with pytest.raises(ValueError, match="data_sha256"):
        _train(exp, str(data), tmp_path / "run", 2)


def _ddp_replayed_in_one_process(data, batch_size, world_size=2, seed=0, lr=1e-3):
    """One epoch of train-deeplab's DistributedDataParallel training, replayed in this process rank by rank:
    each rank's share of the epoch (DistributedSampler) and its own random stream (the dropout seed of
    (seed, epoch, rank)), batch norm over that rank's batch starting from rank 0's running statistics (DDP
    broadcasts them before every forward; rank 0's are kept), and the ranks' gradients averaged before Adam's
    step. Returns the model's state dict after the epoch."""
    images, labels, scores = td.load_synthetic(data)
    dataset = td.SyntheticSegmentationDataset(images, labels, td.filter_indices(scores), 32)
    td.seed_everything(seed)
    model = td.build_deeplab("resnet50", 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    ranks = []
    for rank in range(world_size):
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        sampler.set_epoch(0)
        torch.manual_seed(td.epoch_seed(seed, 0, rank))
        batches = iter(DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=0))
        ranks.append([batches, torch.get_rng_state()])
    buffers = {name: b for name, b in model.named_buffers()}
    for _ in range(len(ranks[0][0])):
        rank0_buffers = {name: b.clone() for name, b in buffers.items()}
        optimizer.zero_grad(set_to_none=True)
        for rank in reversed(range(world_size)):  # rank 0 last: its batch-norm statistics are the ones kept
            for name, b in buffers.items():
                b.copy_(rank0_buffers[name])
            batches, rng = ranks[rank]
            torch.set_rng_state(rng)
            x, y = next(batches)
            F.cross_entropy(model(x)["out"], y, ignore_index=255).backward()
            ranks[rank][1] = torch.get_rng_state()
        for p in model.parameters():
            p.grad.div_(world_size)
        optimizer.step()
    return model.state_dict()


def test_two_gloo_processes_train_as_ddp_replayed_in_one_process(experiment, tmp_path):
    """Two processes (batch 2 each) train one epoch as DDP prescribes: each rank on its share of the epoch
    with its own dropout stream and batch statistics, gradients averaged. This is not a one-process run with
    batch 4: batch norm normalises each rank's 2 images alone and each rank draws its own dropout masks, so
    the comparison is with the epoch replayed rank by rank in this process."""
    exp, cfg = experiment
    data = str(tmp_path / "samples_32x32x3.npz")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ddpm_seg.commands.train_deeplab", "--exp", exp, "--data_path", data,
           "--out_dir", str(tmp_path / "ddp"), "--backbone", "resnet50", "--batch_size", "2", "--num_epoch", "1",
           "--num_workers", "0", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Rank 0 wrote the checkpoint of the plain model (no DDP `module.` prefix), loadable as the original's.
    last = torch.load(tmp_path / "ddp" / "deeplab_last.pth", weights_only=True)["model_state_dict"]
    best = torch.load(tmp_path / "ddp" / "deeplab_best.pth", weights_only=True)["model_state_dict"]
    model = td.build_deeplab("resnet50", 3)
    model.load_state_dict(best)
    # Both ranks' gradients, averaged: the same weights as the replay. The all-reduce adds two float32 values
    # and halves them, which rounds exactly as the replay's accumulate-then-halve, so every tensor is equal.
    replay = _ddp_replayed_in_one_process(data, batch_size=2)
    assert td.epoch_seed(0, 0, 0) != td.epoch_seed(0, 0, 1)  # each rank its own dropout stream
    assert last.keys() == replay.keys()
    for key, value in replay.items():
        assert torch.equal(last[key], value), key
        assert torch.equal(best[key], value), key
    # The metrics are the trained model's, scored on the test images by the shared metric.
    with open(tmp_path / "ddp" / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["best_epoch"] == 0 and metrics["num_train_samples"] == 9
    assert metrics["miou"] == pytest.approx(miou_on_test_images(model, cfg), abs=1e-12)


def test_backbone_starts_from_a_local_resnet_file(tmp_path):
    torch.manual_seed(1)
    resnet = torchvision.models.resnet50(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")
    model = td.build_deeplab("resnet50", 3, str(tmp_path / "resnet50.pth"))
    assert torch.equal(model.backbone.layer4[2].conv3.weight, resnet.layer4[2].conv3.weight)
    assert torch.equal(model.backbone.bn1.running_var, resnet.bn1.running_var)
    torch.save({"conv1.weight": resnet.conv1.weight}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing keys"):
        td.build_deeplab("resnet50", 3, str(tmp_path / "partial.pth"))
