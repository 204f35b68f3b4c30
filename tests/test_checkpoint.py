import json
import os
import pickle

import pytest
import torch

from guided_diffusion.checkpoint import CheckpointError, load_ddpm, read_model_flags, safe_load
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16", num_head_channels=16,
            learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True, diffusion_steps=100)


def _save_tiny(path, **overrides):
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY, **overrides})
    torch.save(model.state_dict(), path)
    return model


def test_strict_load_reproduces_outputs(tmp_path):
    path = str(tmp_path / "tiny.pt")
    saved = _save_tiny(path)
    # The output layer is zero-initialised; give it weights so equal outputs mean something.
    with torch.no_grad():
        for p in saved.out.parameters():
            p.normal_()
    torch.save(saved.state_dict(), path)
    model, diffusion = load_ddpm(path, TINY)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 60])
    saved.eval()
    assert torch.equal(model(x, t), saved(x, t)) and diffusion.num_timesteps == 100
    assert not model.training


def test_use_fp16_on_cpu_warns_and_stays_float32(tmp_path):
    path = str(tmp_path / "tiny.pt")
    _save_tiny(path)
    with pytest.warns(UserWarning, match="use_fp16 is ignored on CPU"):
        model, _ = load_ddpm(path, {**TINY, "use_fp16": True})
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model(torch.randn(1, 3, 32, 32), torch.tensor([5])).dtype == torch.float32


@pytest.mark.parametrize("saved_flags,hint", [
    ({"learn_sigma": False}, "3 output channels, the model 6: try --learn_sigma False"),
    ({"num_channels": 64}, "64 base channels: try --num_channels 64"),
    ({"image_size": 64, "channel_mult": "1,2,3,4"}, "check --channel_mult, or the image size (dim[0]"),
    ({"image_size": 64}, "--image_size in train-ddpm), which sets its default"),
    ({"image_size": 16}, "the number of resolution levels or res blocks differs"),
    ({"class_cond": True}, "try --class_cond True"),
    ({"attention_resolutions": "8"}, "check --attention_resolutions"),
])
def test_mismatch_lists_keys_and_suggests_flag(tmp_path, saved_flags, hint):
    path = str(tmp_path / "other.pt")
    _save_tiny(path, **saved_flags)
    with pytest.raises(CheckpointError) as err:
        load_ddpm(path, TINY)
    message = str(err.value)
    assert "other.pt" in message and hint in message
    assert any(s in message for s in ("missing keys", "unexpected keys", "shape mismatches"))


def test_shape_mismatch_names_the_key(tmp_path):
    path = str(tmp_path / "sigma.pt")
    _save_tiny(path, learn_sigma=False)
    with pytest.raises(CheckpointError, match=r"out\.2\.weight: checkpoint \(3, 32, 3, 3\) vs model \(6, 32, 3, 3\)"):
        load_ddpm(path, TINY)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_ddpm(str(tmp_path / "nothing.pt"), TINY)


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.pt"
    _save_tiny(str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint")
    for bad in (truncated, text):
        with pytest.raises(CheckpointError, match=f"{bad.name}.*not a readable PyTorch checkpoint"):
            load_ddpm(str(bad), TINY)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": torch.load(good, weights_only=True), "step": 3}, wrapped)
    with pytest.raises(CheckpointError, match="wrapped.pt.* is not usable: expected a state_dict of tensors"):
        load_ddpm(str(wrapped), TINY)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, writer in (("zip.pt", lambda p: torch.save({"w": _RunsCode()}, p)),
                         ("legacy.pt", lambda p: pickle.dump({"w": _RunsCode()}, open(p, "wb")))):
        writer(name)
        with pytest.raises(CheckpointError, match=f"{name}.*refused.*could execute code"):
            safe_load(name)
    assert not os.path.exists("PWNED")


def test_model_flags_beside_checkpoint(tmp_path):
    path = tmp_path / "ema.pt"
    _save_tiny(str(path))
    assert read_model_flags(str(path)) is None
    (tmp_path / "model_flags.json").write_text(json.dumps(TINY))
    assert read_model_flags(str(path)) == TINY
    (tmp_path / "model_flags.json").write_text(json.dumps({**TINY, "num_chanels": 3}))
    with pytest.raises(CheckpointError, match=r"unknown model flags \['num_chanels'\]"):
        read_model_flags(str(path))


def test_bad_model_flags_file_names_it(tmp_path):
    path = tmp_path / "ema.pt"
    _save_tiny(str(path))
    (tmp_path / "model_flags.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"model_flags.json: not valid JSON"):
        read_model_flags(str(path))
    (tmp_path / "model_flags.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"model_flags.json: expected a JSON object of model flags"):
        read_model_flags(str(path))
