import argparse
import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_seg.ddpm_training import (EMA, ImageFolderDataset, ShardedBatchSampler, _resolve_options, _train_step,
                                    parse_resume_step, step_generator, train_ddpm, train_ddpm_defaults)
from ddpm_seg.demo_data import generate_demo_dataset
from ddpm_seg.seeding import seed_everything
from guided_diffusion.checkpoint import load_ddpm
from guided_diffusion.script_util import add_dict_to_argparser, create_model_and_diffusion, model_and_diffusion_defaults

# A tiny UNet (two levels, 32 channels) on 16x16 images: a training step takes milliseconds.
TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
            diffusion_steps=100, batch_size=8, num_workers=0, device="cpu", log_interval=1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "demo"
    return generate_demo_dataset(str(root), image_size=16, num_pool=16, num_train=1, num_test=1)["unlabelled"]


def _losses(log_path):
    with open(log_path) as f:
        return [json.loads(line)["loss"] for line in f]


def _sd(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_loss_goes_down_via_the_command_line_flags(images, tmp_path):
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, train_ddpm_defaults())
    argv = [f"--{k}={v}" for k, v in TINY.items()]
    args = parser.parse_args(argv + [f"--data_dir={images}", f"--out_dir={tmp_path}", "--lr=2e-3", "--max_steps=30"])
    result = train_ddpm(vars(args))
    assert result["step"] == 30
    losses = _losses(result["log"])
    assert len(losses) == 30
    # Untrained, the zero-initialised output predicts no noise: loss ~1. Measured 0.83 over the first 5 steps, 0.19 over the last 5.
    assert sum(losses[:5]) / 5 > 0.8
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_checkpoints_load_strictly_from_model_flags(images, tmp_path):
    result = train_ddpm({**TINY, "data_dir": images, "out_dir": str(tmp_path), "max_steps": 2, "ema_rate": "0.9,0.5"})
    assert sorted(os.listdir(tmp_path)) == sorted([
        "model000002.pt", "opt000002.pt", "ema_0.9_000002.pt", "ema_0.5_000002.pt",
        "model_flags.json", "train_log.jsonl"])  # and no temporary files
    with open(result["model_flags"]) as f:
        flags = json.load(f)
    assert flags["num_channels"] == 32 and flags["channel_mult"] == "1,2"
    model, _ = create_model_and_diffusion(**flags)
    for path in [result["model"], *result["ema"].values()]:
        model.load_state_dict(_sd(path), strict=True)
    loaded, _ = load_ddpm(result["model"], flags)
    assert all(torch.equal(v, _sd(result["model"])[k]) for k, v in loaded.state_dict().items())
    # The EMAs moved towards the weights at different speeds: all three differ.
    model_sd, ema9, ema5 = _sd(result["model"]), _sd(result["ema"][0.9]), _sd(result["ema"][0.5])
    key = "out.2.weight"  # zero at init, so any update shows
    assert not torch.equal(model_sd[key], ema5[key]) and not torch.equal(ema5[key], ema9[key])
    assert set(_sd(result["opt"])) == {"state", "param_groups"}


def test_resume_follows_the_uninterrupted_run(images, tmp_path):
    common = {**TINY, "data_dir": images, "lr": 1e-3, "lr_anneal_steps": 6, "ema_rate": "0.9"}
    straight = train_ddpm({**common, "out_dir": str(tmp_path / "a"), "save_interval": 3})
    assert straight["step"] == 6 and os.path.isfile(tmp_path / "a" / "model000003.pt")

    middle = str(tmp_path / "a" / "model000003.pt")
    assert parse_resume_step(middle) == 3
    resumed = train_ddpm({**common, "out_dir": str(tmp_path / "b"), "resume_checkpoint": middle})
    assert resumed["step"] == 6
    assert [json.loads(line)["step"] for line in open(resumed["log"])] == [4, 5, 6]
    for a, b in [(straight["model"], resumed["model"]), (straight["ema"][0.9], resumed["ema"][0.9])]:
        sa, sb = _sd(a), _sd(b)
        assert all(torch.allclose(sa[k], sb[k], rtol=0, atol=1e-6) for k in sa), (a, b)
    # Without the saved EMA and optimizer the continuation would differ: such a set is refused, not resumed fresh.
    os.remove(tmp_path / "a" / "ema_0.9_000003.pt")
    os.remove(tmp_path / "a" / "opt000003.pt")
    with pytest.raises(ValueError, match="incomplete checkpoint set, ema_0.9_000003.pt, opt000003.pt missing"):
        train_ddpm({**common, "out_dir": str(tmp_path / "c"), "resume_checkpoint": middle})


def test_resume_takes_this_runs_lr_not_the_saved_one(images, tmp_path):
    common = {**TINY, "data_dir": images, "out_dir": str(tmp_path), "save_interval": 2}
    train_ddpm({**common, "lr": 1e-3, "max_steps": 2})
    # The saved optimizer state holds lr 1e-3; the rerun asks for 4e-4 and must train at it.
    result = train_ddpm({**common, "lr": 4e-4, "weight_decay": 0.01, "max_steps": 4})
    logged = [json.loads(line) for line in open(result["log"])]
    assert [r["lr"] for r in logged] == [1e-3, 1e-3, 4e-4, 4e-4]
    group = _sd(result["opt"])["param_groups"][0]
    assert group["lr"] == 4e-4 and group["weight_decay"] == 0.01


def test_cooldown_decays_lr_to_zero_and_keeps_the_constant_run_before_it(images, tmp_path):
    common = {**TINY, "data_dir": images, "lr": 1e-3, "save_interval": 2}
    train_ddpm({**common, "out_dir": str(tmp_path / "constant"), "max_steps": 6})
    cooled = train_ddpm({**common, "out_dir": str(tmp_path / "cooled"), "max_steps": 6, "lr_cooldown_steps": 4})
    lrs = [json.loads(line)["lr"] for line in open(cooled["log"])]
    # lr of update k+1 (logged at step k+1) is 1e-3 * min(1, (6 - k) / 4).
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4], rel=1e-9)
    # Up to the cooldown's start the two runs are the same; after it they part.
    for step, same in ((2, True), (4, False), (6, False)):
        a, b = (_sd(tmp_path / run / f"model{step:06d}.pt") for run in ("constant", "cooled"))
        assert all(torch.equal(a[k], b[k]) for k in a) == same, step
    with pytest.raises(ValueError, match=r"--lr_cooldown_steps must be between 1 and --max_steps \(6\), got 7"):
        train_ddpm({**common, "out_dir": str(tmp_path / "bad"), "max_steps": 6, "lr_cooldown_steps": 7})


def test_microbatches_give_the_full_batch_update(images, tmp_path):
    common = {**TINY, "data_dir": images, "max_steps": 1}
    full = train_ddpm({**common, "out_dir": str(tmp_path / "full")})
    micro = train_ddpm({**common, "out_dir": str(tmp_path / "micro"), "microbatch": 3})
    sf, sm = _sd(full["model"]), _sd(micro["model"])
    assert all(torch.allclose(sf[k], sm[k], rtol=0, atol=1e-6) for k in sf)
    assert _losses(full["log"])[0] == pytest.approx(_losses(micro["log"])[0], abs=1e-5)


def test_bf16_autocast_step_is_close_to_fp32(images, tmp_path):
    # Step 1's loss does not depend on precision (the zero-initialised head outputs 0); step 3's does.
    common = {**TINY, "data_dir": images, "max_steps": 3, "lr": 1e-3}
    fp32 = _losses(train_ddpm({**common, "out_dir": str(tmp_path / "fp32")})["log"])[2]
    bf16 = _losses(train_ddpm({**common, "out_dir": str(tmp_path / "bf16"), "precision": "bf16"})["log"])[2]
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)


def test_dataset_finds_images_recursively_and_centre_crops(tmp_path):
    # 48x32 (WxH): red, green and blue thirds; the 16x16 centre crop of its 24x16 resize is green.
    thirds = np.zeros((32, 48, 3), dtype=np.uint8)
    for i in range(3):
        thirds[:, 16 * i : 16 * (i + 1), i] = 255
    (tmp_path / "sub").mkdir()
    Image.fromarray(thirds).save(tmp_path / "sub" / "a.png")
    Image.fromarray(thirds).convert("L").save(tmp_path / "b.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(str(tmp_path), 16)
    assert len(dataset) == 2
    x = dataset.paths.index(str(tmp_path / "sub" / "a.png"))
    image = dataset[x]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert torch.allclose(image[:, 8, 8], torch.tensor([-1.0, 1.0, -1.0]), atol=0.05)
    assert dataset[1 - x].shape == (3, 16, 16)  # greyscale jpg comes out as RGB


def test_bad_options_are_refused(images, tmp_path):
    with pytest.raises(ValueError, match="learning_rate"):
        train_ddpm({**TINY, "data_dir": images, "out_dir": str(tmp_path), "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="out_dir"):
        train_ddpm({**TINY, "data_dir": images})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images \(.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp, .gif\) found under data_dir"):
        train_ddpm({**TINY, "data_dir": str(empty), "out_dir": str(tmp_path / "o")})
    with pytest.raises(ValueError, match="batch_size"):
        train_ddpm({**TINY, "data_dir": images, "out_dir": str(tmp_path / "o"), "batch_size": 17})


class _NoUpdate:
    """An optimizer stand-in for _train_step: gradients accumulate over calls, the caller steps."""

    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        pass


def _ddp_replayed_in_one_process(images, steps, world_size=2, seed=0):
    """train-ddpm's DistributedDataParallel training replayed in this process rank by rank: each rank's shard
    (ShardedBatchSampler) and its own timesteps, noise and flips (step_generator(seed, rank, step)), the ranks'
    gradients averaged before one AdamW step, then the EMA. Returns (model, EMA state dicts, rank 0's losses)."""
    opts = _resolve_options({**TINY, "data_dir": images, "out_dir": "unused", "max_steps": steps})
    seed_everything(seed)
    model, diffusion = create_model_and_diffusion(**{k: getattr(opts, k) for k in model_and_diffusion_defaults()})
    ema = EMA(model, 0.9999)
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    dataset = ImageFolderDataset(images, TINY["image_size"])
    shards = [iter(ShardedBatchSampler(len(dataset), TINY["batch_size"], seed, rank, world_size, 0))
              for rank in range(world_size)]
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        for rank in range(world_size):
            batch = torch.stack([dataset[i] for i in next(shards[rank])])
            loss = _train_step(model, diffusion, _NoUpdate(), batch, step_generator(seed, rank, step), -1,
                               contextlib.nullcontext)
            if rank == 0:
                losses.append(loss.item())
        for p in model.parameters():
            p.grad.div_(world_size)
        opt.step()
        ema.update(model)
    return model.state_dict(), ema.state_dict(model), losses


def test_two_process_ddp_on_cpu(images, tmp_path):
    """Two gloo processes of batch 8 train as DDP prescribes: each rank its shard of every epoch with its own
    timesteps, noise and flips, gradients averaged. This is not a one-process run with batch 16 (that one draws
    all 16 images' timesteps and noise from rank 0's generator), so the comparison is with the steps replayed
    rank by rank in this process."""
    flags = [f"--{k}={v}" for k, v in TINY.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ddpm_seg.commands.train_ddpm", *flags, f"--data_dir={images}", f"--out_dir={tmp_path}", "--max_steps=2"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 16 images over 2 ranks of batch 8: one batch per rank per step; rank 0 alone wrote the files.
    assert sorted(os.listdir(tmp_path)) == sorted([
        "model000002.pt", "opt000002.pt", "ema_0.9999_000002.pt", "model_flags.json", "train_log.jsonl"])
    with open(tmp_path / "model_flags.json") as f:
        model, _ = create_model_and_diffusion(**json.load(f))
    model.load_state_dict(_sd(tmp_path / "model000002.pt"), strict=True)
    # The all-reduce adds the two ranks' float32 gradients and halves them, which rounds exactly as the replay's
    # accumulate-then-halve; both sides compute with one thread. So the weights, the EMA and the logged loss
    # (rank 0's) are equal, not merely close.
    weights, ema, losses = _ddp_replayed_in_one_process(images, steps=2)
    # The replay takes the shards and the draws from the library; here, that they differ between the ranks: each
    # rank its own half of the epoch and its own timesteps and noise.
    first = [next(iter(ShardedBatchSampler(16, 8, 0, rank, 2, 0))) for rank in range(2)]
    assert sorted(first[0] + first[1]) == list(range(16))
    assert not torch.equal(torch.randn(8, generator=step_generator(0, 0, 0)),
                           torch.randn(8, generator=step_generator(0, 1, 0)))
    for saved, replayed in [(_sd(tmp_path / "model000002.pt"), weights), (_sd(tmp_path / "ema_0.9999_000002.pt"), ema)]:
        assert saved.keys() == replayed.keys()
        for key in saved:
            assert torch.equal(saved[key], replayed[key]), key
    assert _losses(tmp_path / "train_log.jsonl") == losses


def test_a_save_cut_short_publishes_no_file_of_the_set(images, tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def save_fails_on_the_optimizer(obj, f, *args, **kwargs):
        calls.append(obj)
        if set(obj) == {"state", "param_groups"}:  # the last file of the set
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_fails_on_the_optimizer)
    with pytest.raises(OSError, match=r"cannot write .*opt000001.pt: no space left on the device"):
        train_ddpm({**TINY, "data_dir": images, "out_dir": str(tmp_path), "max_steps": 1})
    assert len(calls) == 3  # model and EMA were written (to temporary files), then the optimizer failed
    assert sorted(os.listdir(tmp_path)) == ["model_flags.json", "train_log.jsonl"]  # no model without its set


def test_keep_doubling_keeps_the_sets_at_doubling_steps_and_the_last(images, tmp_path):
    common = {**TINY, "data_dir": images, "out_dir": str(tmp_path), "ema_rate": "0.9", "save_interval": 2,
              "keep": "doubling"}

    def sets():
        return sorted(int(name[5:-3]) for name in os.listdir(tmp_path) if name.startswith("model0"))

    train_ddpm({**common, "max_steps": 6})
    assert sets() == [2, 4, 6]
    before = torch.load(tmp_path / "ema_0.9_000004.pt", weights_only=True)
    train_ddpm({**common, "max_steps": 11})  # resumes from 6; 6 and 10 are dropped once a later set is whole
    assert sets() == [2, 4, 8, 11]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"{kind}{s:06d}.pt" for kind in ("model", "opt", "ema_0.9_") for s in (2, 4, 8, 11)]
        + ["model_flags.json", "train_log.jsonl"])  # whole sets only, nothing orphaned
    after = torch.load(tmp_path / "ema_0.9_000004.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)  # kept sets are left as they were
    with pytest.raises(ValueError, match="--keep must be all or doubling, got 'some'"):
        train_ddpm({**common, "keep": "some"})


def test_rerun_resumes_from_the_last_complete_set_and_removes_stale_files(images, tmp_path, capsys):
    common = {**TINY, "data_dir": images, "out_dir": str(tmp_path), "lr": 1e-3, "ema_rate": "0.9", "save_interval": 1}
    train_ddpm({**common, "max_steps": 2})
    os.remove(tmp_path / "opt000002.pt")  # as if killed while publishing step 2's set
    (tmp_path / ".model000003.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    capsys.readouterr()
    result = train_ddpm({**common, "max_steps": 3})  # no --resume_checkpoint: resumes by default
    err = capsys.readouterr().err
    assert (f"resuming from {tmp_path}/model000001.pt, the last complete checkpoint set in --out_dir "
            "(model000002.pt is an incomplete set and is not used)") in err
    assert result["step"] == 3
    assert "\r" not in err and "train-ddpm: 100%" in err  # the bar in a log (not a terminal): whole lines
    assert [json.loads(line)["step"] for line in open(result["log"])] == [1, 2, 2, 3]  # steps 2 and 3 trained again
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"{kind}{s:06d}.pt" for kind in ("model", "opt", "ema_0.9_") for s in (1, 2, 3)]
        + ["model_flags.json", "train_log.jsonl"])  # step 2's set was written whole, the stale .tmp is gone
    # Resuming into a folder of another model is refused rather than mixed.
    with pytest.raises(ValueError, match=r"holds checkpoints made with other model flags \(\{'num_channels': 32\} vs"):
        train_ddpm({**common, "max_steps": 4, "num_channels": 64})


def test_ctrl_c_in_train_ddpm_exits_130_naming_the_last_set(images, tmp_path, monkeypatch, capsys):
    import ddpm_seg.ddpm_training as module
    from ddpm_seg import cli

    real_step, steps = module._train_step, []

    def ctrl_c_at_step_3(*args):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(module, "_train_step", ctrl_c_at_step_3)
    argv = [f"--{k}={v}" for k, v in TINY.items()] + [f"--data_dir={images}", f"--out_dir={tmp_path}",
                                                     "--save_interval=2", "--max_steps=5"]
    monkeypatch.setattr(sys, "argv", ["ddpm-seg", "train-ddpm", *argv])
    assert cli.entry() == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"ddpm-seg train-ddpm: interrupted: stopped after step 2; the last checkpoint set is model000002.pt (step 2) "
        f"in {tmp_path}: run the same command again to resume from it")
    assert "Traceback" not in err


def test_ema_update_is_the_moving_average_of_every_parameter():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    ema = EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    state = ema.state_dict(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(state[name], 0.9 * start[name] + 0.1 * p.detach(), rtol=1e-6, atol=1e-7)
    # Buffers are not averaged: they are copied from the model as they are.
    assert torch.equal(state["1.running_var"], model[1].running_var)
