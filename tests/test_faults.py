"""Faults and bad input: one clear line and exit code 2 for every failure, no half-written file,
no silent wrong result. Disk-full and read-only cases use a real tmpfs where the tests run as root (as in CI),
and an injected ENOSPC/EROFS elsewhere."""

import errno
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from ddpm_seg import cli, files, progress
from ddpm_seg.backbones import create_feature_extractor
from ddpm_seg.class_info import class_table
from ddpm_seg.config import experiment_suffix, load_experiment, validate_experiment
from ddpm_seg.data import read_label
from ddpm_seg.ensemble import MLPEnsemble, train_ensemble
from ddpm_seg.feature_store import FeatureStore, PixelSampler
from ddpm_seg.deeplab_training import load_synthetic
from guided_diffusion.checkpoint import CheckpointError, load_ddpm, safe_load
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_UNET = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16", num_head_channels=16,
                 learn_sigma=True, diffusion_steps=100)


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(name, size, readonly) -> a fresh tmpfs mount under tmp_path (root only: skipped elsewhere)."""
    mounted = []

    def mount(name, size="1m", readonly=False):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (the injected-errno variant covers this case)")
        path = tmp_path / name
        path.mkdir()
        options = f"size={size}" + (",ro" if readonly else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def run_cli(monkeypatch, capsys, *argv):
    """ddpm-seg <argv> through the console script's entry point: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ddpm-seg", *argv])
    code = cli.entry()
    return code, capsys.readouterr().err


def one_error_line(err, command):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"ddpm-seg {command}: error: "), err
    return lines[0]


def write_config(path, cfg):
    path.write_text(json.dumps(cfg))
    return str(path)


# ---- 2. blocks and steps ----

def test_blocks_and_steps_are_sorted_so_both_orders_are_one_run(experiment, tmp_path):
    path, cfg = experiment
    a = load_experiment(write_config(tmp_path / "a.json", dict(cfg, blocks=[5, 2], steps=[30, 10])))
    b = load_experiment(write_config(tmp_path / "b.json", dict(cfg, blocks=[2, 5], steps=[10, 30])))
    assert a.blocks == b.blocks == [2, 5] and a.steps == b.steps == [10, 30]
    assert experiment_suffix(a) == experiment_suffix(b) == "10_30_2_5"
    # Features come in ascending block order, as the original extractor walks output_blocks.
    extractor = create_feature_extractor(a, TINY_UNET, torch.device("cpu"))
    assert extractor.blocks == [2, 5] and extractor.steps == [10, 30]


@pytest.mark.parametrize("key,values", [("blocks", [5, 2, 5]), ("steps", [10, 10])])
def test_repeated_blocks_or_steps_are_refused_naming_the_config(experiment, tmp_path, key, values):
    _, cfg = experiment
    path = write_config(tmp_path / "rep.json", dict(cfg, **{key: values}))
    with pytest.raises(ValueError, match=rf"rep.json: '{key}' lists {values[-1]} more than once"):
        load_experiment(path)


# ---- 3. disk full ----

def test_disk_store_on_a_full_tmpfs_is_one_line_not_a_bus_error(experiment, tmpfs):
    path, cfg = experiment
    disk = tmpfs("small", size="16k")  # the run's JSON files fit, the feature store (~80 KiB) does not
    result = subprocess.run([sys.executable, "-m", "ddpm_seg.cli", "train-interpreter", "--exp", str(path),
                             "--device", "cpu", "--store", "disk", "--run_dir", str(disk / "run")],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ddpm-seg train-interpreter: error: cannot write the feature store in {disk}/run/features: "
                           "it needs ") and "free; free some space, or use --store ram" in last
    assert "Traceback" not in result.stderr
    assert not os.path.exists(disk / "run" / "features")  # no table file, no empty folder


def test_feature_store_injected_enospc_leaves_no_file(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(files.WriteError, match=r"cannot write .*table0.f16: no space left on the device \(.* free\)"):
        FeatureStore([(4, 8, 8)], (16, 16), 3, root=str(tmp_path / "store"))
    assert not os.path.exists(tmp_path / "store")


def test_feature_store_too_big_for_the_free_space_is_refused_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setattr("ddpm_seg.feature_store.free_bytes", lambda path: 1000)
    with pytest.raises(files.WriteError, match=r"needs 1.5 KiB more and the disk has 1000 B free"):
        FeatureStore([(4, 8, 8)], (16, 16), 3, root=str(tmp_path / "store"))
    assert not os.path.exists(tmp_path / "store")


def test_checkpoint_on_a_full_tmpfs_is_a_write_error_and_leaves_nothing(tmpfs):
    disk = tmpfs("small", size="256k")
    with pytest.raises(files.WriteError) as err:
        files.atomic_torch_save({"w": torch.zeros(200_000)}, str(disk / "model_0.pth"))
    assert str(err.value).startswith(f"cannot write {disk}/model_0.pth: no space left on the device (")
    assert os.listdir(disk) == []


class FullDisk:
    """A file whose every write() fails as on a full disk: ENOSPC and, as write() raises it, no file name."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_the_disk_under_files(monkeypatch):
    real_open = open
    monkeypatch.setattr(files, "open", lambda path, mode="r", *a, **k: FullDisk(real_open(path, mode, *a, **k)),
                        raising=False)


def test_injected_enospc_in_torch_and_numpy_saves_names_the_file(tmp_path, monkeypatch):
    fill_the_disk_under_files(monkeypatch)
    for save, name in [(lambda p: files.atomic_torch_save({"w": torch.ones(3)}, p), "a.pt"),
                       (lambda p: files.atomic_save_npy(p, np.ones(3)), "b.npy"),
                       (lambda p: files.atomic_write_json(p, {"a": 1}), "c.json")]:
        with pytest.raises(files.WriteError, match=rf"cannot write {tmp_path}/{name}: no space left on the device"):
            save(str(tmp_path / name))
    assert os.listdir(tmp_path) == []


def test_a_full_disk_under_a_log_names_the_log(tmp_path, monkeypatch):
    log = tmp_path / "train_log.jsonl"
    files.append_line(str(log), '{"step": 1}')
    fill_the_disk_under_files(monkeypatch)
    with pytest.raises(files.WriteError, match=rf"cannot write {log}: no space left on the device"):
        files.append_line(str(log), '{"step": 2}')
    monkeypatch.undo()
    assert log.read_text() == '{"step": 1}\n'  # earlier lines untouched


def test_enospc_reaching_the_cli_is_one_line(monkeypatch, capsys):
    def fail(argv=None):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/train_log.jsonl")

    monkeypatch.setattr(cli, "main", fail)
    code, err = run_cli(monkeypatch, capsys, "train-ddpm")
    assert code == 2
    line = one_error_line(err, "train-ddpm")
    assert line.startswith("ddpm-seg train-ddpm: error: cannot write /data/runs/x/train_log.jsonl: no space left on the device")


def test_permission_denied_on_a_read_is_not_called_a_write(monkeypatch, capsys):
    def fail(argv=None):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/ckpt/ema.pt")

    monkeypatch.setattr(cli, "main", fail)
    code, err = run_cli(monkeypatch, capsys, "train-interpreter")
    assert code == 2
    assert one_error_line(err, "train-interpreter") == \
        "ddpm-seg train-interpreter: error: /data/ckpt/ema.pt: permission denied; check its permissions"


# ---- 4. read-only output folders ----

def _tiny_images(folder, n=2):
    from PIL import Image
    os.makedirs(folder)
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f"{folder}/{i}.png")


def _members(cfg):
    from ddpm_seg.config import run_dir
    ensemble = MLPEnsemble(cfg["dim"][-1], cfg["number_class"], cfg["model_num"])
    for m in range(cfg["model_num"]):
        ensemble.save_member(os.path.join(run_dir(validate_experiment(cfg), 0), f"model_{m}.pth"), m)


@pytest.mark.parametrize("command", ["train-interpreter", "train-ddpm", "generate-dataset", "report"])
def test_read_only_output_folder_is_one_line_before_any_work(experiment, tmp_path, tmpfs, monkeypatch, capsys, command):
    path, cfg = experiment
    ro = tmpfs("ro", readonly=True)
    out = str(ro / "out")
    if command == "train-interpreter":
        argv = ["--exp", str(path), "--device", "cpu", "--run_dir", out]
    elif command == "train-ddpm":
        _tiny_images(str(tmp_path / "images"))
        argv = ["--data_dir", str(tmp_path / "images"), "--out_dir", out, "--device", "cpu", "--max_steps", "2",
                *[f"--{k}={v}" for k, v in TINY_UNET.items()]]
    elif command == "generate-dataset":
        _members(cfg)
        argv = ["--exp", str(path), "--device", "cpu", "--num_samples", "1", "--diffusion_steps", "100", "--out_dir", out]
    else:
        runs = tmp_path / "runs" / "tiny" / "ddpm" / "seed_0"
        runs.mkdir(parents=True)
        (runs / "metrics.json").write_text(json.dumps({"miou": 0.5, "seed": 0, "model_type": "ddpm", "random_init": False}))
        argv = [str(tmp_path / "runs"), "--out", os.path.join(out, "report")]
    code, err = run_cli(monkeypatch, capsys, command, *argv)
    assert code == 2
    line = one_error_line(err, command)
    assert line.startswith(f"ddpm-seg {command}: error: cannot write {ro}") and \
        line.endswith("the file system is read-only; choose another output folder"), line
    assert "%|" not in err  # no progress bar: nothing started


def test_unwritable_folder_injected_eacces_is_one_line(tmp_path, monkeypatch, capsys):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    runs = tmp_path / "runs" / "tiny" / "ddpm" / "seed_0"
    runs.mkdir(parents=True)
    (runs / "metrics.json").write_text(json.dumps({"miou": 0.5, "seed": 0, "model_type": "ddpm", "random_init": False}))
    monkeypatch.setattr(files.tempfile, "mkstemp", denied)
    code, err = run_cli(monkeypatch, capsys, "report", str(tmp_path / "runs"), "--out", str(tmp_path / "locked" / "r"))
    assert code == 2
    assert one_error_line(err, "report") == (f"ddpm-seg report: error: cannot write {tmp_path}/locked: no write "
                                             "permission; choose another output folder or fix its permissions")


# ---- 5. Ctrl-C ----

def test_ctrl_c_in_train_interpreter_says_what_was_saved_and_exits_130(experiment, monkeypatch, capsys):
    path, cfg = experiment

    def train_one_then_ctrl_c(ensemble, store, sampler, *, on_member_done, **kwargs):
        on_member_done(0)
        raise KeyboardInterrupt

    monkeypatch.setattr("ddpm_seg.recipe.train_ensemble", train_one_then_ctrl_c)
    code, err = run_cli(monkeypatch, capsys, "train-interpreter", "--exp", str(path), "--device", "cpu",
                        "--store", "disk")
    folder = os.path.join(cfg["exp_dir"], "10_30_2_5", "seed_0")
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"ddpm-seg train-interpreter: interrupted: 1 of 3 members saved in {folder} and the features extracted so "
        "far (disk store); run the same command again to resume")


def test_ctrl_c_elsewhere_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    code, err = run_cli(monkeypatch, capsys, "sweep")
    assert code == 130
    assert err == "ddpm-seg sweep: interrupted: files written so far are complete (none is left half-written)\n"


# ---- 6. misleading diagnoses ----

def test_random_bytes_are_not_a_checkpoint_rather_than_unsafe(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError) as err:
        safe_load(str(path))
    assert "is not a PyTorch checkpoint: it is neither a zip archive" in str(err.value)
    assert "execute code" not in str(err.value)


def test_pickled_code_is_still_refused_as_unsafe(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "f": zipfile.ZipInfo("x")}, path)
    with pytest.raises(CheckpointError, match="could execute code"):
        safe_load(str(path))


def test_a_resnet_state_dict_is_not_called_a_unet_with_other_flags(tmp_path):
    import torchvision
    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_ddpm(str(path), TINY_UNET)
    message = str(err.value)
    assert message == (f"{str(path)!r} cannot be loaded: this is not a guided-diffusion UNet checkpoint: none of its "
                       "122 keys (e.g. conv1.weight, bn1.weight, bn1.bias) belongs to one (time_embed, input_blocks, "
                       "middle_block, output_blocks, out)")
    assert "try --" not in message and "check --" not in message


def _save_unet(path, **flags):
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY_UNET, **flags})
    torch.save(model.state_dict(), path)


def test_scale_shift_hint_only_when_scale_shift_differs(tmp_path):
    _save_unet(tmp_path / "wide.pt", num_channels=64)
    with pytest.raises(CheckpointError) as err:
        load_ddpm(str(tmp_path / "wide.pt"), TINY_UNET)
    assert "try --num_channels 64" in str(err.value) and "use_scale_shift_norm" not in str(err.value)
    _save_unet(tmp_path / "plain.pt", use_scale_shift_norm=False)
    with pytest.raises(CheckpointError, match="try --use_scale_shift_norm False"):
        load_ddpm(str(tmp_path / "plain.pt"), TINY_UNET)


def test_image_size_hint_names_dim0_which_overrides_the_flag(tmp_path):
    _save_unet(tmp_path / "big.pt", image_size=64)
    with pytest.raises(CheckpointError, match=r"dim\[0\] of an experiment config, which overrides --image_size"):
        load_ddpm(str(tmp_path / "big.pt"), {**TINY_UNET, "image_size": 16})


def test_folders_given_as_config_or_checkpoint_are_called_folders(experiment, tmp_path):
    _, cfg = experiment
    with pytest.raises(ValueError, match=f"experiment config '{tmp_path}' is a folder; expected a JSON file"):
        load_experiment(str(tmp_path))
    with pytest.raises(CheckpointError, match=f"checkpoint '{tmp_path}' is a folder; expected a checkpoint file"):
        safe_load(str(tmp_path))


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_config_with_a_byte_order_mark_loads(experiment, tmp_path, encoding):
    _, cfg = experiment
    path = tmp_path / "bom.json"
    path.write_text(json.dumps(cfg), encoding=encoding)
    assert load_experiment(str(path)).blocks == cfg["blocks"]


def test_config_in_another_encoding_names_the_file(experiment, tmp_path):
    _, cfg = experiment
    path = tmp_path / "latin.json"
    path.write_bytes(json.dumps(dict(cfg, class_names=["mur", "fenêtre", "sol"]), ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}: not UTF-8 text \(byte b'\\xea' at offset \d+\); save it as UTF-8"):
        load_experiment(str(path))


def test_block_out_of_range_names_the_config(experiment, monkeypatch, capsys):
    path, cfg = experiment
    path.write_text(json.dumps(dict(cfg, blocks=[2, 40])))
    code, err = run_cli(monkeypatch, capsys, "train-interpreter", "--exp", str(path), "--device", "cpu")
    assert code == 2
    assert one_error_line(err, "train-interpreter") == (
        f"ddpm-seg train-interpreter: error: {path}: blocks [40] out of range: this UNet has output blocks 0..7")


def test_bad_seeds_name_the_flag(experiment, monkeypatch, capsys):
    path, _ = experiment
    code, err = run_cli(monkeypatch, capsys, "train-interpreter", "--exp", str(path), "--seeds", "0,a")
    assert code == 2
    assert one_error_line(err, "train-interpreter") == \
        "ddpm-seg train-interpreter: error: --seeds must be a comma list of integers >= 0 like 0,1,2, got '0,a'"
    code, err = run_cli(monkeypatch, capsys, "train-interpreter", "--exp", str(path), "--seeds", "0,-1")
    assert code == 2 and one_error_line(err, "train-interpreter").endswith("got '0,-1'")


def test_npz_under_a_npy_label_name_is_refused_in_one_line(tmp_path):
    np.savez(tmp_path / "0.npz", np.zeros((4, 4), np.int64))
    os.replace(tmp_path / "0.npz", tmp_path / "0.npy")
    with pytest.raises(ValueError, match=r"label '.*0.npy' is an .npz archive \(arrays \['arr_0'\]\); expected one array"):
        read_label(str(tmp_path / "0.png"), str(tmp_path), (4, 4), 3, 255)


def test_synthetic_dataset_truncated_or_plain_npy_is_one_line(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8), np.uint8), np.zeros(2, np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="samples.npz: not a readable .npz archive"):
        load_synthetic(str(path))
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"plain.npy: holds a single array \(np.save's .npy format\)"):
        load_synthetic(str(tmp_path / "plain.npy"))


# ---- 9. everything validated before settings.json ----

def test_negative_lr_fails_before_anything_is_written(experiment, monkeypatch, capsys):
    path, cfg = experiment
    code, err = run_cli(monkeypatch, capsys, "train-interpreter", "--exp", str(path), "--device", "cpu", "--lr", "-1")
    assert code == 2
    assert one_error_line(err, "train-interpreter") == "ddpm-seg train-interpreter: error: --lr must be positive, got -1.0"
    assert not os.path.exists(cfg["exp_dir"])


def test_category_table_with_another_number_class_needs_own_names(experiment, tmp_path):
    _, cfg = experiment
    bedroom = dict(cfg, category="bedroom_28")  # copied from bedroom_28, but 3 classes
    with pytest.raises(ValueError, match="bad.json: category 'bedroom_28' has 29 classes but number_class is 3; "
                                         "add 'class_names'"):
        load_experiment(write_config(tmp_path / "bad.json", bedroom))
    own = load_experiment(write_config(tmp_path / "own.json", dict(bedroom, class_names=["bed", "wall", "floor"])))
    names, palette = class_table(own)
    assert names == ["bed", "wall", "floor"] and palette.shape == (3, 3)


# ---- 10. progress output in a redirected log ----

def test_a_bar_in_a_log_writes_whole_lines_at_most_a_minute_apart(capsys):
    bar = progress.progress_bar(total=10000, desc="work")
    for _ in range(10000):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err  # no redraws over one line
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("work: ")]
    assert len(err.splitlines()) == 2 and "10000/10000" in err.splitlines()[-1]  # the start and the end


def test_members_bar_in_a_log_is_a_few_records_and_a_summary(capsys):
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 8, 8))
    store = FeatureStore([(4, 8, 8)], (8, 8), 2, dtype=torch.float32)
    for i in range(2):
        store.put(i, [torch.randn(4, 8, 8)])
    ensemble = MLPEnsemble(4, 3, 2)
    stats = train_ensemble(ensemble, store, PixelSampler(labels), seed=0, batch_size=8, max_epochs=10)
    assert max(s["steps"] for s in stats.values()) >= 80  # one record per step would be 80+ records
    err = capsys.readouterr().err  # captured: not a terminal
    records = [r for r in err.replace("\r", "\n").splitlines() if r.strip()]
    assert len(records) <= 4, records
    assert records[-1].startswith("trained members [0, 1] in ") and "last mean batch loss" in records[-1]
