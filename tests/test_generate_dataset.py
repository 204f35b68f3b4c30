"""generate-dataset on a tiny random DDPM and a tiny ensemble: reproducibility over workers, resume, file format."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ddpm_seg.commands.generate_dataset as command
import ddpm_seg.synthetic_data as gen
from ddpm_seg.commands.flags import options_from_flags, resolve_model_flags
from ddpm_seg.backbones import create_feature_extractor
from ddpm_seg.config import load_experiment, run_dir, validate_experiment
from ddpm_seg.ensemble import MLPEnsemble, predict_logits
from ddpm_seg.evaluate import image_uncertainty_score, majority_vote, uncertainty_map
from ddpm_seg.files import LOCK_NAME
from conftest import lock_held_by_a_live_process
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, attention_resolutions="8", num_head_channels=32,
            learn_sigma=True, diffusion_steps=40)
STEPS, BLOCKS = [5, 20], [1, 3]


@pytest.fixture
def experiment(tmp_path):
    """A random-init DDPM checkpoint (with its model_flags.json) and a 2-member ensemble in the run folder."""
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY})
    (tmp_path / "ckpt").mkdir()
    torch.save(model.state_dict(), tmp_path / "ckpt" / "ema.pt")
    (tmp_path / "ckpt" / "model_flags.json").write_text(json.dumps(TINY))
    cfg = {
        "exp_dir": str(tmp_path / "runs"), "model_type": "ddpm", "category": "tiny", "number_class": 3,
        "ignore_label": 255, "training_path": str(tmp_path), "testing_path": str(tmp_path),
        "model_path": str(tmp_path / "ckpt" / "ema.pt"), "dim": [16, 16, 1], "steps": STEPS, "blocks": BLOCKS,
        "model_num": 2, "batch_size": 64, "training_number": 1, "testing_number": 1, "upsample_mode": "bilinear",
        "share_noise": True, "input_activations": False,
    }
    extractor = create_feature_extractor(validate_experiment(cfg), TINY, torch.device("cpu"), seed=0)
    maps = extractor(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    cfg["dim"][2] = sum(m.shape[0] for m in maps)
    # An untrained ensemble, its batch norms set to the statistics of one image's pixels and its weights
    # enlarged, so that its labels vary over the image and its members disagree (a random UNet's features
    # are nearly constant, and the plain init would label every pixel alike).
    ensemble = MLPEnsemble(cfg["dim"][2], 3, 2, seed=0)
    pixels = torch.cat([F.interpolate(m[None], size=(16, 16), mode="bilinear")[0] for m in maps]).flatten(1).t()
    ensemble.bn1.momentum = ensemble.bn2.momentum = 1.0
    with torch.no_grad():
        for fc in (ensemble.fc1, ensemble.fc2, ensemble.fc3):
            fc.weight.mul_(10)
        ensemble(pixels.expand(2, -1, -1))
    for m in range(2):
        ensemble.save_member(os.path.join(run_dir(validate_experiment(cfg), 0), f"model_{m}.pth"), m)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return str(path), cfg


def _argv(exp, out_dir, *extra):
    return ["--exp", exp, "--device", "cpu", "--num_samples", "5", "--batch_size", "2", "--out_dir", str(out_dir),
            *extra]


def _generate(argv):
    parser = argparse.ArgumentParser()
    command.add_args(parser)
    args = parser.parse_args(argv)
    cfg = load_experiment(args.exp)
    return gen.generate_dataset(cfg, args.exp, resolve_model_flags(cfg, args, argv), options_from_flags(gen.GenerateOptions, args))


def _arrays(path):
    with np.load(path) as npz:
        return [npz[k] for k in ("arr_0", "arr_1", "arr_2")]


def test_two_gloo_processes_give_the_same_file_as_one(experiment, tmp_path):
    exp, _ = experiment
    one = _generate(_argv(exp, tmp_path / "one"))["path"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ddpm_seg.commands.generate_dataset", *_argv(exp, tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = str(tmp_path / "two" / "samples_16x16x3.npz")
    # Each chunk is the same batch on either side and every sample has its own noise, so the files are equal.
    for a, b in zip(_arrays(one), _arrays(two)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # Chunks 0 and 2 were rank 0's, chunk 1 rank 1's: the merged file is in sample order.
    assert "on 2 process(es)" in proc.stdout


def test_npz_opens_as_the_original_expects(experiment, tmp_path):
    exp, cfg = experiment
    path = _generate(_argv(exp, tmp_path))["path"]
    assert os.path.basename(path) == "samples_16x16x3.npz"
    # The original train_deeplab.py: `images, labels, uncertainty_scores = np.load(data_path).values()`.
    images, labels, scores = np.load(path).values()
    assert images.dtype == np.uint8 and images.shape == (5, 16, 16, 3)
    assert labels.dtype == np.uint8 and labels.shape == (5, 16, 16) and labels.max() < 3
    assert scores.dtype == np.float32 and scores.shape == (5,) and np.all(scores >= 0)
    assert len({im.tobytes() for im in images}) == 5  # every sample has its own noise
    # The shards are merged and removed; the index of settings stays.
    assert os.listdir(tmp_path / "samples_16x16x3_shards") == ["index.json"]


def test_labels_are_those_of_a_real_image_with_that_pixels(experiment, tmp_path, cpu_branch):
    exp, cfg = experiment
    images, labels, scores = _arrays(_generate(_argv(exp, tmp_path))["path"])
    # The members' folder records no precision: both pick the CPU's --extract_dtype auto.
    extractor = create_feature_extractor(validate_experiment(cfg), TINY, torch.device("cpu"), seed=0, dtype="auto")
    assert extractor.model.dtype == (torch.bfloat16 if cpu_branch else torch.float32)
    ensemble = MLPEnsemble(cfg["dim"][2], 3, 2)
    for m in range(2):
        ensemble.load_member(os.path.join(run_dir(validate_experiment(cfg), 0), f"model_{m}.pth"), m)
    assert len(np.unique(labels)) > 1 and scores.min() > 1e-3
    for image, label, score in zip(images, labels, scores):
        logits = predict_logits(ensemble, extractor(image), (16, 16))
        assert np.array_equal(majority_vote(logits).numpy(), label)
        assert score == pytest.approx(image_uncertainty_score(uncertainty_map(logits)), rel=1e-5)


@pytest.mark.parametrize("use_ddim,respacing", [(False, ""), (True, "ddim10")])
def test_a_sample_depends_on_its_index_not_its_batch(use_ddim, respacing):
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY})
    model.eval()
    diffusion = gen.sampling_diffusion({**model_and_diffusion_defaults(), **TINY, "timestep_respacing": respacing})
    assert diffusion.num_timesteps == (10 if respacing else 40)
    alone = gen.sample_images(model, diffusion, [7], seed=3, image_size=(16, 16), use_ddim=use_ddim)
    batch = gen.sample_images(model, diffusion, [6, 7, 8], seed=3, image_size=(16, 16), use_ddim=use_ddim)
    other_seed = gen.sample_images(model, diffusion, [7], seed=4, image_size=(16, 16), use_ddim=use_ddim)
    # Another batch may round differently in the last float bits, which can move a pixel by one level.
    assert np.abs(alone[0].astype(int) - batch[1]).max() <= 1
    assert np.abs(alone[0].astype(int) - other_seed[0]).mean() > 10


def test_a_stopped_run_resumes_to_the_same_file_without_duplicates(experiment, tmp_path, monkeypatch):
    exp, _ = experiment
    reference = _arrays(_generate(_argv(exp, tmp_path / "ref"))["path"])

    saved, sampled = [], []
    real_save, real_sample = gen.save_chunk, gen.sample_images

    def save_then_stop(path, *args):
        real_save(path, *args)
        saved.append(os.path.basename(path))
        if len(saved) == 2:
            raise KeyboardInterrupt  # as if the job were killed after its second chunk

    monkeypatch.setattr(gen, "save_chunk", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _generate(_argv(exp, tmp_path / "run"))
    assert saved == ["chunk_000000.npz", "chunk_000001.npz"]
    assert not os.path.exists(tmp_path / "run" / "samples_16x16x3.npz")

    monkeypatch.setattr(gen, "save_chunk", real_save)
    monkeypatch.setattr(gen, "sample_images", lambda model, diffusion, indices, *a: sampled.append(list(indices))
                        or real_sample(model, diffusion, indices, *a))
    result = _generate(_argv(exp, tmp_path / "run"))
    assert sampled == [[4]] and result["new_samples"] == 1  # only the missing chunk was made
    for a, b in zip(reference, _arrays(result["path"])):
        assert np.array_equal(a, b)

    # A finished run is left as it is.
    assert _generate(_argv(exp, tmp_path / "run"))["new_samples"] == 0 and sampled == [[4]]


def test_other_settings_are_refused_on_resume(experiment, tmp_path):
    exp, _ = experiment
    _generate(_argv(exp, tmp_path))
    with pytest.raises(ValueError, match="sample_seed"):
        _generate(_argv(exp, tmp_path, "--sample_seed", "1"))


def test_missing_ensemble_is_a_clear_error(experiment, tmp_path):
    exp, _ = experiment
    with pytest.raises(FileNotFoundError, match="model_0.pth"):
        _generate(_argv(exp, tmp_path / "out", "--run_dir", str(tmp_path / "nowhere")))


def test_a_second_run_into_the_same_folder_is_refused_not_left_waiting(experiment, tmp_path):
    exp, _ = experiment
    folder = tmp_path / "samples_16x16x3_shards"
    folder.mkdir()
    with lock_held_by_a_live_process(folder) as owner:
        with pytest.raises(ValueError, match=rf"in use by another generate-dataset run \(process {owner} on"):
            _generate(_argv(exp, tmp_path))
        assert sorted(os.listdir(folder)) == [LOCK_NAME]  # nothing written, the owner's lock kept
    # Its process gone, the lock is stale: the next run takes it over, finishes and releases it.
    result = _generate(_argv(exp, tmp_path))
    assert len(_arrays(result["path"])[0]) == 5 and not os.path.exists(folder / LOCK_NAME)


def test_a_missing_ensemble_leaves_no_folder_that_refuses_the_next_try(experiment, tmp_path):
    exp, _ = experiment
    with pytest.raises(FileNotFoundError, match="model_0.pth"):
        _generate(_argv(exp, tmp_path / "out", "--seed", "7"))  # no ensemble was trained with seed 7
    assert not os.path.exists(tmp_path / "out")


def test_more_samples_continue_a_finished_run(experiment, tmp_path, monkeypatch):
    exp, _ = experiment

    def argv(n):
        return ["--exp", exp, "--device", "cpu", "--num_samples", str(n), "--batch_size", "2", "--out_dir", str(tmp_path)]

    first = _arrays(_generate(argv(4))["path"])
    sampled, real_sample = [], gen.sample_images
    monkeypatch.setattr(gen, "sample_images", lambda model, diffusion, indices, *a: sampled.append(list(indices))
                        or real_sample(model, diffusion, indices, *a))
    grown = _generate(argv(6))
    assert grown["new_samples"] == 2 and sampled == [[4, 5]]  # only the new samples are made
    arrays = _arrays(grown["path"])
    assert len(arrays[0]) == 6 and all(np.array_equal(a[:4], b) for a, b in zip(arrays, first))
    with pytest.raises(ValueError, match="already holds 6 samples, more than --num_samples 4"):
        _generate(argv(4))


def test_retrained_members_or_another_checkpoint_are_refused_on_resume(experiment, tmp_path, monkeypatch):
    """Chunks labelled by other members, or sampled from another checkpoint, are never mixed into one file."""
    exp, cfg = experiment
    real_save = gen.save_chunk

    def save_then_stop(path, *args):
        real_save(path, *args)
        raise KeyboardInterrupt  # killed after the first chunk

    monkeypatch.setattr(gen, "save_chunk", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _generate(_argv(exp, tmp_path))
    monkeypatch.setattr(gen, "save_chunk", real_save)
    member = os.path.join(run_dir(validate_experiment(cfg), 0), "model_1.pth")
    original = open(member, "rb").read()
    retrained = MLPEnsemble(cfg["dim"][2], 3, 2, seed=5)
    retrained.save_member(member, 1)
    with pytest.raises(ValueError, match="ensemble_sha256"):
        _generate(_argv(exp, tmp_path))
    open(member, "wb").write(original)
    torch.manual_seed(3)  # another checkpoint with the same flags, at the same path
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY})
    torch.save(model.state_dict(), cfg["model_path"])
    with pytest.raises(ValueError, match="model_sha256"):
        _generate(_argv(exp, tmp_path))


def test_a_run_that_fails_before_its_first_chunk_leaves_no_index_that_refuses_the_corrected_rerun(
        experiment, tmp_path, monkeypatch):
    exp, _ = experiment

    def fail(*args):
        raise ValueError("sampling failed")

    real_sample = gen.sample_images
    monkeypatch.setattr(gen, "sample_images", fail)
    with pytest.raises(ValueError, match="sampling failed"):
        _generate(_argv(exp, tmp_path, "--sample_seed", "9"))
    assert not os.path.exists(tmp_path / "samples_16x16x3_shards" / gen.INDEX_NAME)
    monkeypatch.setattr(gen, "sample_images", real_sample)
    assert len(_arrays(_generate(_argv(exp, tmp_path))["path"])[0]) == 5  # other settings: not refused
