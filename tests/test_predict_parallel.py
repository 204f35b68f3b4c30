"""`ddpm-seg predict` under torchrun: the inputs shared over 2 gloo processes, each segmented once, the outputs
those one process writes, a stopped run resumed with another number of processes, an unreadable input named."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import test_predict
from ddpm_seg.data import list_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = ("--uncertainty", "--suggest", "2")
OUTPUT_FOLDERS = ("masks", "uncertainty", "overlays")

trained = test_predict.trained  # the tiny experiment, trained once for this module


def run_predict(run, inputs, out, processes=None):
    """`ddpm-seg predict` in a process of its own, or in `processes` processes under torchrun; one intra-op
    thread in each, so that their float sums are the same."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes else []
    cmd = [sys.executable, *launcher, "-m", "ddpm_seg.cli", "predict", "--run_dir", run, "--input",
           *map(str, inputs), "--out", str(out), "--device", "cpu", *OPTIONS]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def outputs(out) -> dict:
    """{path below --out: bytes} of every mask, uncertainty and overlay file."""
    return {str(p.relative_to(out)): p.read_bytes() for folder in OUTPUT_FOLDERS
            for p in sorted((out / folder).glob("**/*")) if p.is_file()}


def journals(out) -> dict:
    """{journal name: (header, [image of each row])} of every journal in --out."""
    found = {}
    for path in sorted(out.glob(".predict_journal*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        found[path.name] = (records[0], [r["image"] for r in records[1:]])
    return found


def listed_images(out) -> list:
    return sorted(image for _, images in journals(out).values() for image in images)


def relative(path, folder) -> str:
    """The text of `path` with the input folder's path left out of the file names."""
    return path.read_text().replace(str(folder) + os.sep, "")


@pytest.fixture(scope="module")
def images(trained):
    """The folder of the experiment's 7 images (train/ and test/)."""
    _, cfg, _ = trained
    return os.path.dirname(cfg["training_path"])


@pytest.fixture(scope="module")
def reference(trained, images, tmp_path_factory):
    """--out of one process over `images`."""
    out = tmp_path_factory.mktemp("one") / "out"
    proc = run_predict(trained[2], [images], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_processes_segment_each_input_once_and_write_what_one_writes(trained, images, reference, tmp_path):
    out = tmp_path / "two"
    proc = run_predict(trained[2], [images], out, processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = outputs(reference)
    assert len(expected) == 7 * 4 and outputs(out) == expected
    for name in ("predictions.csv", "suggest.txt"):
        assert (out / name).read_text() == (reference / name).read_text()
    # Input i was segmented by process i % 2 alone, each with the one-process journal's header.
    inputs = list_images(images)
    (header, _), = journals(reference).values()
    assert journals(out) == {".predict_journal.jsonl": (header, inputs[0::2]),
                             ".predict_journal.1.jsonl": (header, inputs[1::2])}
    assert proc.stdout.count("images segmented in") == 1 and "7 images segmented" in proc.stdout


def test_a_run_resumes_with_another_number_of_processes(trained, images, reference, tmp_path):
    run, folder, out = trained[2], tmp_path / "grown", tmp_path / "out"
    names = [os.path.relpath(p, images) for p in list_images(images)]
    for name in names[:3]:
        os.makedirs(folder / os.path.dirname(name), exist_ok=True)
        shutil.copyfile(os.path.join(images, name), folder / name)
    assert run_predict(run, [folder], out).returncode == 0
    for name in names[3:]:
        os.makedirs(folder / os.path.dirname(name), exist_ok=True)
        shutil.copyfile(os.path.join(images, name), folder / name)
    # Two processes: only the 4 images the first run did not see, 2 each.
    proc = run_predict(run, [folder], out, processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 of 7 images were segmented by an earlier run" in proc.stdout
    assert listed_images(out) == sorted(list_images(str(folder)))  # each image once over all journals
    # One process again: the second process's journal counts; only the image whose mask is gone is done again.
    os.remove(out / "masks" / (os.path.splitext(names[3])[0] + ".png"))
    proc = run_predict(run, [folder], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 of 7 images were segmented by an earlier run" in proc.stdout
    assert outputs(out) == outputs(reference)
    for name in ("predictions.csv", "suggest.txt"):
        assert relative(out / name, folder) == relative(reference / name, images)
    # Other options start afresh, without the second process's journal: once their run has overwritten the
    # overlays, its rows would name outputs of other options to a later run with the first ones.
    assert test_predict.predict(run, [folder], out, "--no_overlay") == 0
    assert list(journals(out)) == [".predict_journal.jsonl"]


def test_an_unreadable_input_fails_every_process_after_the_others_are_written(trained, images, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("000.png", "002.png", "003.png"):
        shutil.copyfile(os.path.join(images, "train", name), folder / name)
    (folder / "001.png").write_text("not an image")  # input 1: the second process's
    proc = run_predict(trained[2], [folder], out, processes=2)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # torchrun's report of the failed processes: both exit with 1, but the first exit makes torchrun stop the other,
    # which may be ended by its SIGTERM (-15) a moment before it exits by itself.
    exits = dict(re.findall(r"rank\s*: (\d+).*\n\s*exitcode\s*: (-?\d+)", proc.stderr))
    assert set(exits) == {"0", "1"} and "1" in exits.values() and set(exits.values()) <= {"1", "-15"}, exits
    # The first process names it in the summary, having gathered the second's failures.
    assert proc.stdout.count("failed: ") == 1 and f"failed: {folder / '001.png'}: " in proc.stdout
    assert sorted(os.listdir(out / "masks")) == ["000.png", "002.png", "003.png"]
    assert [row["image"] for row in test_predict.read_csv(out / "predictions.csv")] == [
        str(folder / name) for name in ("000.png", "002.png", "003.png")]
