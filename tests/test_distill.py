"""`ddpm-seg distill`: the interpreter's labels of unlabelled images, the uncertainty filter, the student it trains
and predict with that student; a run killed mid-labelling and mid-training ends as an uninterrupted one; under
torchrun each image is labelled once and the labels are those of one process; bad inputs are one line."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import test_predict
from ddpm_seg.cli import entry as cli_entry
from ddpm_seg.data import list_images, load_split, read_image
from ddpm_seg.deeplab import NetworkSegmenter
from ddpm_seg.distillation import LAST_NAME, evaluate_segmenter, labelling_digest
from ddpm_seg.interpreter import Interpreter
from scenes import square_and_bar
from test_kill_resume import _kill_when

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES, NUM_EPOCH, TRIES = 10, 3, 3
# Small and fast; batch 2 so that 8 kept images make 4 steps an epoch in one process and 2 in each of two.
SMALL = ("--student", "lraspp_mobilenet_v3", "--resolution", "32", "--num_workers", "0", "--batch_size", "2",
         "--num_epoch", str(NUM_EPOCH), "--device", "cpu")
# Timings are the only entries of metrics.json that a rerun may change.
TIMINGS = ("labelling_s", "training_s")

trained = test_predict.trained  # the tiny interpreter, trained once for this module


def distill_command(run, images, out, *extra, processes=None):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes else []
    return [sys.executable, *launcher, "-m", "ddpm_seg.cli", "distill", "--run_dir", str(run), "--images",
            str(images), "--out", str(out), *SMALL, *extra]


def run_distill(run, images, out, *extra, processes=None):
    """distill in processes of its own; one intra-op thread each, so that reruns give the same floats."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(distill_command(run, images, out, *extra, processes=processes), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def masks(folder) -> dict:
    """{stem: bytes} of every mask PNG in `folder`/masks."""
    return {p.stem: p.read_bytes() for p in sorted((folder / "masks").glob("*.png"))}


def journal_rows(path) -> list:
    lines = [line for line in open(path).read().split("\n") if line]
    return [json.loads(line) for line in lines[1:]]


def metrics_of(folder) -> dict:
    return json.load(open(folder / "metrics.json"))


def student_state(folder) -> dict:
    return torch.load(folder / "student.pth", weights_only=True)["model_state_dict"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """NUM_IMAGES unlabelled images (no .npy beside them), not the interpreter's training images, some of
    other sizes than the interpreter's 32 x 32."""
    folder = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(7)
    sizes = {1: (40, 28), 4: (24, 36)}  # (width, height)
    for i in range(NUM_IMAGES):
        image = Image.fromarray(square_and_bar(rng, 32, 4)[0])
        if i in sizes:
            image = image.resize(sizes[i], Image.BILINEAR)
        image.save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def distilled(trained, pool, tmp_path_factory):
    """A student folder: one process, the 20% most uncertain images left out; (folder, stdout)."""
    out = tmp_path_factory.mktemp("distilled") / "student"
    proc = run_distill(trained[2], pool, out, "--uncertainty_portion", "0.2")
    return out, proc.stdout


def test_the_student_learns_the_kept_labels_of_the_interpreter_and_predict_segments_with_it(trained, pool, distilled,
                                                                                            tmp_path):
    _, cfg, run = trained
    out, stdout = distilled
    assert {"student.pth", "experiment.json", "metrics.json", "settings.json"} <= set(os.listdir(out))
    metrics, settings = metrics_of(out), json.load(open(out / "settings.json"))
    assert (metrics["num_images"], metrics["num_labelled"], metrics["num_kept"]) == (10, 10, 8)
    assert metrics["interpreter_miou"] == json.load(open(os.path.join(run, "metrics.json")))["miou"]
    assert "8 of 10 labelled images kept" in stdout

    # The labels are the interpreter's, at each image's size, with its uncertainty scores.
    interpreter = Interpreter.load(run, device="cpu")
    paths = list_images(str(pool))
    labels = masks(out / "labels")
    assert sorted(labels) == [f"{i:03d}" for i in range(NUM_IMAGES)]
    rows = {row["image"]: row for row in test_predict.read_csv(out / "labels" / "predictions.csv")}
    assert sorted(rows) == sorted(paths)
    for path in paths:
        expected, _, score = interpreter(read_image(path))
        mask = Image.open(out / "labels" / "masks" / (os.path.basename(path)[:-4] + ".png"))
        assert np.array_equal(np.asarray(mask), expected), path
        assert float(rows[path]["uncertainty_score"]) == pytest.approx(score, rel=1e-6)
    assert Image.open(out / "labels" / "masks" / "001.png").size == (40, 28)

    # The student learnt the 8 images of lowest score: settings.json's digest is that of exactly those.
    journal = {row["image"]: row for row in journal_rows(out / "labels" / ".predict_journal.jsonl")}
    by_score = sorted(paths, key=lambda p: journal[p]["score"])
    kept = [journal[p] for p in paths if p in by_score[:8]]
    assert settings["labels_sha256"] == labelling_digest(settings["interpreter"], kept)
    assert settings["labels_sha256"] != labelling_digest(settings["interpreter"], [journal[p] for p in paths])

    # Its test mIoU is that of the student it saved, on the experiment's test images.
    student = NetworkSegmenter.load_student(str(out))
    test_items = load_split(interpreter.cfg, "test")
    assert metrics["num_test_images"] == len(test_items) == 3
    assert metrics["miou"] == pytest.approx(evaluate_segmenter(student, test_items).miou(), abs=1e-12)

    # predict with the student folder writes the student's labels.
    predicted = tmp_path / "predicted"
    assert test_predict.predict(str(out), [pool], predicted) == 0
    rows = {row["image"]: row for row in test_predict.read_csv(predicted / "predictions.csv")}
    assert sorted(rows) == sorted(paths)
    for path in paths:
        expected, _, score = student(read_image(path))
        mask = Image.open(predicted / "masks" / (os.path.basename(path)[:-4] + ".png"))
        assert np.array_equal(np.asarray(mask), expected), path
        assert float(rows[path]["uncertainty_score"]) == pytest.approx(score, rel=1e-6)


def test_a_second_student_shares_the_labels_and_keeps_every_image_without_the_filter(trained, pool, distilled,
                                                                                    tmp_path):
    out, labels_dir = tmp_path / "all", distilled[0] / "labels"
    before = masks(labels_dir)
    proc = run_distill(trained[2], pool, out, "--uncertainty_portion", "0", "--labels_dir", labels_dir,
                       "--num_epoch", "1")
    assert "10 of 10 images were segmented by an earlier run" in proc.stdout
    metrics = metrics_of(out)
    assert (metrics["num_labelled"], metrics["num_kept"], metrics["best_epoch"]) == (10, 10, 0)
    assert masks(labels_dir) == before and not (out / "labels").exists()
    journal = journal_rows(labels_dir / ".predict_journal.jsonl")
    settings = json.load(open(out / "settings.json"))
    assert settings["labels_sha256"] == labelling_digest(settings["interpreter"], journal)


def test_a_distill_killed_mid_labelling_and_mid_training_ends_as_the_uninterrupted_one(trained, pool, distilled,
                                                                                      tmp_path, monkeypatch):
    run, (reference, _) = trained[2], distilled
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the killed runs' environment, as run_distill's
    cmd = lambda out: distill_command(run, pool, out, "--uncertainty_portion", "0.2")  # noqa: E731
    for attempt in range(TRIES):
        out = tmp_path / f"killed{attempt}"
        journal = out / "labels" / ".predict_journal.jsonl"

        def labelled():
            try:
                return len(journal_rows(journal))
            except (OSError, ValueError):  # not there yet, or a row being written
                return 0

        if not (_kill_when(cmd(out), tmp_path / f"labelling{attempt}.log", lambda: labelled() >= 3)
                and labelled() < NUM_IMAGES):
            continue
        done = labelled()
        assert not (out / "settings.json").exists()
        # Again, killed once the first epoch's training state is saved.
        if not (_kill_when(cmd(out), tmp_path / f"training{attempt}.log", (out / LAST_NAME).is_file)
                and not (out / "student.pth").exists()):
            continue
        epoch = torch.load(out / LAST_NAME, weights_only=True)["epoch"]
        if epoch < NUM_EPOCH - 1:
            break
    else:
        pytest.fail(f"no run was killed mid-labelling and then mid-training in {TRIES} tries")
    log = open(tmp_path / f"training{attempt}.log").read()
    assert f"{done} of 10 images were segmented by an earlier run" in log

    proc = run_distill(run, pool, out, "--uncertainty_portion", "0.2")
    assert "10 of 10 images were segmented by an earlier run" in proc.stdout
    assert f"resuming after epoch {epoch}" in proc.stdout
    assert masks(out / "labels") == masks(reference / "labels")
    assert (out / "labels" / "predictions.csv").read_text() == (reference / "labels" / "predictions.csv").read_text()
    ours, theirs = student_state(out), student_state(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    strip = lambda metrics: {k: v for k, v in metrics.items() if k not in TIMINGS}  # noqa: E731
    assert strip(metrics_of(out)) == strip(metrics_of(reference))


def test_two_processes_label_each_image_once_as_one_process_and_train_one_student(trained, pool, distilled, tmp_path):
    run, (reference, _) = trained[2], distilled
    out = tmp_path / "two"
    proc = run_distill(run, pool, out, "--uncertainty_portion", "0.2", processes=2)
    assert masks(out / "labels") == masks(reference / "labels")
    assert (out / "labels" / "predictions.csv").read_text() == (reference / "labels" / "predictions.csv").read_text()
    # Input i was labelled by process i % 2 alone.
    paths = list_images(str(pool))
    assert [r["image"] for r in journal_rows(out / "labels" / ".predict_journal.jsonl")] == paths[0::2]
    assert [r["image"] for r in journal_rows(out / "labels" / ".predict_journal.1.jsonl")] == paths[1::2]
    # What the student learns from is what one process's student learns from.
    assert json.load(open(out / "settings.json")) == json.load(open(reference / "settings.json"))
    # One student, tested once by the first process: metrics.json is that of the student saved.
    assert proc.stdout.count("student test mIoU") == 1 and proc.stdout.count("labelled images kept") == 1
    metrics = metrics_of(out)
    assert (metrics["num_labelled"], metrics["num_kept"], metrics["best_epoch"]) == (10, 8, NUM_EPOCH - 1)
    student = NetworkSegmenter.load_student(str(out))
    test_items = load_split(Interpreter.load(run, device="cpu").cfg, "test")
    assert metrics["miou"] == pytest.approx(evaluate_segmenter(student, test_items).miou(), abs=1e-12)
    assert torch.load(out / LAST_NAME, weights_only=True)["epoch"] == NUM_EPOCH - 1


def one_line_error(monkeypatch, capsys, *argv):
    """distill through the console script: (exit code, stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["ddpm-seg", "distill", *map(str, argv)])
    code = cli_entry()
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_inputs_are_one_line_and_exit_code_2_with_nothing_written(trained, pool, distilled, tmp_path,
                                                                      monkeypatch, capsys):
    run, (student, _) = trained[2], distilled
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    cases = [
        (["--run_dir", run, "--images", empty], "no images"),
        (["--run_dir", empty, "--images", pool], "is not a train-interpreter run folder"),
        (["--run_dir", student, "--images", pool], "is a student folder"),
        (["--run_dir", run, "--images", pool, "--uncertainty_portion", "1.5"], "must lie in [0, 1), got 1.5"),
    ]
    for argv, message in cases:
        code, err = one_line_error(monkeypatch, capsys, *argv, "--out", out, *SMALL)
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
        assert err[0].startswith("ddpm-seg distill: error: ") and "Traceback" not in err[0]
        assert not out.exists(), argv
    with pytest.raises(SystemExit) as exit_:
        one_line_error(monkeypatch, capsys, "--run_dir", run, "--images", pool, "--out", out, *SMALL,
                       "--student", "unet")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "--student: invalid choice: 'unet'" in err[-1]
    assert not out.exists()


def test_another_student_or_interpreter_into_the_same_folder_is_refused_and_changes_nothing(
        trained, pool, distilled, tmp_path, monkeypatch, capsys):
    run, (out, _) = trained[2], distilled
    # Another interpreter: the same run with member 0 replaced by member 1.
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("predictions"))
    shutil.copyfile(other / "model_1.pth", other / "model_0.pth")
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("**/*")) if p.is_file()}
    settings = out / "settings.json"
    for argv, differ in ((["--run_dir", run, "--student", "deeplabv3_mobilenet_v3"],
                          ["'student': 'lraspp_mobilenet_v3'", "'student': 'deeplabv3_mobilenet_v3'"]),
                         (["--run_dir", other], ["'interpreter': {'members_sha256': "])):
        code, err = one_line_error(monkeypatch, capsys, "--images", pool, "--out", out, *SMALL,
                                   "--uncertainty_portion", "0.2", *argv)
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"ddpm-seg distill: error: {settings}: the files beside it were made with other "
                                 "settings ({"), err
        assert all(text in err[0] for text in differ) and "labels_sha256" not in err[0], err
        # Refused before labelling: the student's labels are still its interpreter's.
        after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("**/*")) if p.is_file()}
        assert after == before
