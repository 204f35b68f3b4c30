"""`ddpm-seg export` and OnnxSegmenter: an exported student segments as the PyTorch network does, with any batch
size, from the .onnx file alone; bad inputs are one line."""

import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_seg.cli import entry as cli_entry
from ddpm_seg.cli import main as cli_main
from ddpm_seg.commands import export as export_command
from ddpm_seg.config import load_experiment
from ddpm_seg.deeplab import NetworkSegmenter, build_network, save_student
from ddpm_seg.onnx_export import (INSTALL_HINT, NOISE_IMAGES, OnnxSegmenter, check_export, check_images,
                                  export_onnx)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "experiments", "demo", "ddpm.json")
RESOLUTION = 64
ARCHITECTURES = ["lraspp_mobilenet_v3", "deeplabv3_mobilenet_v3"]
NOT_OURS = "not an ONNX file exported by ddpm-seg export"


def make_student(folder, architecture, seed=0):
    """A random-weight student of the demo experiment (5 classes) at RESOLUTION. Its BatchNorm statistics are
    randomised too, so that a network run with batch statistics instead (training mode) gives other logits."""
    torch.manual_seed(seed)
    model = build_network(architecture, 5)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2)
    save_student(folder, model.eval(), architecture, RESOLUTION, load_experiment(DEMO))
    return NetworkSegmenter.load_student(folder)


def random_images(sizes, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def exported(request, tmp_path_factory):
    """(PyTorch segmenter, OnnxSegmenter of its export, .onnx path) per architecture, exported once."""
    root = tmp_path_factory.mktemp(request.param)
    segmenter = make_student(root / "student", request.param)
    path = str(root / "student.onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(segmenter, path)
    assert not [str(w.message) for w in caught if "training mode" in str(w.message)]
    return segmenter, OnnxSegmenter.load(path), path


def test_onnx_segments_as_pytorch(exported):
    segmenter, onnx_segmenter, _ = exported
    # The export leaves the network in eval mode.
    assert not any(module.training for module in segmenter.model.modules())
    images = random_images([(30, 40), (64, 64), (47, 81)], seed=1)
    expected, got = segmenter.segment(images), onnx_segmenter.segment(images)
    assert len(np.unique(np.concatenate([labels.ravel() for labels, _, _ in expected]))) >= 2
    for (labels, uncertainty, score), (onnx_labels, onnx_uncertainty, onnx_score) in zip(expected, got):
        np.testing.assert_array_equal(onnx_labels, labels)
        np.testing.assert_allclose(onnx_uncertainty, uncertainty, atol=1e-4)
        assert onnx_score == pytest.approx(score, abs=1e-4)
    result = check_export(segmenter, onnx_segmenter, images)
    assert result["images"] == 3 and result["pixels_differing"] == 0
    assert result["max_abs_logit_diff"] < 1e-4


def test_any_batch_size_gives_the_logits_of_one_image_at_a_time(exported):
    segmenter, onnx_segmenter, _ = exported
    x = onnx_segmenter.input_tensor(random_images([(64, 64), (20, 90), (33, 33)], seed=2))
    batch = onnx_segmenter.forward(x)
    one_by_one = torch.cat([onnx_segmenter.forward(x[i:i + 1]) for i in range(3)])
    assert batch.shape == (3, 5, RESOLUTION, RESOLUTION)
    torch.testing.assert_close(batch, one_by_one, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(batch, segmenter.forward(x), atol=1e-4, rtol=0)


def test_the_file_alone_holds_classes_palette_and_input_size(exported):
    segmenter, onnx_segmenter, path = exported
    loaded = OnnxSegmenter.load(path)
    assert loaded.model is None and loaded.device == torch.device("cpu")
    assert loaded.class_names == ["background", "disc", "square", "triangle", "ring"] == segmenter.class_names
    np.testing.assert_array_equal(loaded.palette, segmenter.palette)
    assert loaded.palette.tolist()[1] == [230, 25, 75]
    assert loaded.resolution == (RESOLUTION, RESOLUTION) and loaded.number_class == 5
    assert loaded.architecture == segmenter.architecture
    assert loaded.cfg.to_dict() == load_experiment(DEMO).to_dict()
    assert loaded.uncertainty_max == pytest.approx(np.log(5))


def test_check_export_counts_what_differs(exported, tmp_path):
    _, onnx_segmenter, _ = exported
    # Another network in the PyTorch segmenter's place: its labels and logits differ, as a broken export's would.
    other = make_student(tmp_path / "other", onnx_segmenter.architecture, seed=1)
    result = check_export(other, onnx_segmenter, random_images([(40, 30), (64, 64)], seed=3))
    assert result["images"] == 2
    assert 0 < result["pixels_differing"] <= 40 * 30 + 64 * 64 and result["max_abs_logit_diff"] > 0.01


def test_check_images_default_to_noise_when_testing_path_has_none(tmp_path):
    cfg = load_experiment(DEMO).replace(testing_path=str(tmp_path / "absent"))
    images, note = check_images(NetworkSegmenter(cfg, None, RESOLUTION, "lraspp_mobilenet_v3"))
    assert len(images) == NOISE_IMAGES and str(tmp_path / "absent") in note
    assert all(image.shape == (RESOLUTION, RESOLUTION, 3) and image.dtype == np.uint8 for image in images)
    assert len({image.tobytes() for image in images}) == NOISE_IMAGES
    (tmp_path / "absent").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "absent" / "a.png")
    read, note = check_images(NetworkSegmenter(cfg, None, RESOLUTION, "lraspp_mobilenet_v3"))
    assert note is None and len(read) == 1 and np.array_equal(read[0], images[0])


def write_pngs(folder, sizes):
    """Random images of `sizes` as PNG files in `folder`: their paths."""
    folder.mkdir()
    paths = [str(folder / f"{i}.png") for i in range(len(sizes))]
    for path, image in zip(paths, random_images(sizes, seed=4)):
        Image.fromarray(image).save(path)
    return paths


def run_cli(*args):
    # One PyTorch thread, as in this process (see conftest.py): spinning threads slow small ops on a busy machine.
    return subprocess.run([sys.executable, "-m", "ddpm_seg.cli", "export", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})


def test_cli_exports_and_checks_with_onnxruntime(tmp_path):
    make_student(tmp_path / "student", "lraspp_mobilenet_v3")
    out = tmp_path / "out"
    run = run_cli("--run_dir", tmp_path / "student", "--onnx", out / "student.onnx", "--check_images",
                  *write_pngs(tmp_path / "check", [(50, 70), (64, 64)]))
    assert run.returncode == 0, run.stderr[-2000:]
    line, = run.stdout.strip().splitlines()
    assert "on 2 images: 0 differing pixels, max |logit diff|" in line, line
    assert os.listdir(out) == ["student.onnx"]  # no temporary file left beside it
    loaded = OnnxSegmenter.load(str(out / "student.onnx"))
    assert loaded.architecture == "lraspp_mobilenet_v3" and loaded.resolution == (RESOLUTION, RESOLUTION)


def test_cli_exits_1_when_labels_differ(exported, tmp_path, monkeypatch, capsys):
    segmenter, _, path = exported
    make_student(tmp_path / "student", segmenter.architecture, seed=1)
    # An export that does not match the network: another student's file.
    monkeypatch.setattr(export_command, "export_onnx", lambda segmenter, out: shutil.copyfile(path, out))
    out = tmp_path / "student.onnx"
    assert cli_main(["export", "--run_dir", str(tmp_path / "student"), "--onnx", str(out), "--check_images",
                     *write_pngs(tmp_path / "check", [(40, 30)])]) == 1
    assert re.search(r"on 1 image: [1-9]\d* differing pixels", capsys.readouterr().out)
    assert out.is_file()


def test_cli_refuses_a_folder_that_is_not_a_student(tmp_path):
    run_dir = tmp_path / "seed_0"  # a train-interpreter run folder
    run_dir.mkdir()
    (run_dir / "settings.json").write_text("{}")
    torch.save({}, run_dir / "model_0.pth")
    run = run_cli("--run_dir", run_dir, "--onnx", tmp_path / "out.onnx")
    assert run.returncode == 2
    line, = run.stderr.strip().splitlines()
    assert line.startswith("ddpm-seg export: error: ") and str(run_dir) in line and "not a student folder" in line
    assert not os.path.exists(tmp_path / "out.onnx")


def test_an_empty_folder_is_one_line(tmp_path, monkeypatch, capsys):
    # entry(), the console script, in this process: the subprocess above shows its status reaches the shell.
    monkeypatch.setattr(sys, "argv", ["ddpm-seg", "export", "--run_dir", str(tmp_path), "--onnx",
                                      str(tmp_path / "out.onnx")])
    assert cli_entry() == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("ddpm-seg export: error: ") and str(tmp_path) in line and "not a student folder" in line
    assert os.listdir(tmp_path) == []


def test_load_refuses_other_files_in_one_line(tmp_path):
    import onnx
    from onnx import helper

    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(foreign))
    for path in (text, empty, foreign):
        with pytest.raises(ValueError) as error:
            OnnxSegmenter.load(str(path))
        assert str(error.value) == f"{path}: {NOT_OURS}"
    with pytest.raises(FileNotFoundError, match="absent.onnx"):
        OnnxSegmenter.load(str(tmp_path / "absent.onnx"))


def test_missing_extra_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ValueError, match=rf"^{re.escape(INSTALL_HINT)} \(.*onnxruntime"):
        OnnxSegmenter.load(str(tmp_path / "student.onnx"))
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    segmenter = NetworkSegmenter(load_experiment(DEMO), build_network("lraspp_mobilenet_v3", 5).eval(), RESOLUTION,
                                 "lraspp_mobilenet_v3")
    with pytest.raises(ValueError, match=rf"^{re.escape(INSTALL_HINT)} \(.*onnxscript"):
        export_onnx(segmenter, str(tmp_path / "never.onnx"))
    assert os.listdir(tmp_path) == []


def test_predict_segments_with_the_onnx_file_as_with_the_student_folder(exported, tmp_path):
    """`predict --onnx` writes the masks and uncertainty maps `predict --run_dir` writes with the student folder."""
    segmenter, _, path = exported
    write_pngs(tmp_path / "in", [(50, 70), (64, 64), (33, 20)])
    student = os.path.join(os.path.dirname(path), "student")
    for flag, model, out in (("--run_dir", student, "torch"), ("--onnx", path, "onnx")):
        assert cli_main(["predict", flag, model, "--input", str(tmp_path / "in"), "--out", str(tmp_path / out),
                         "--uncertainty", "--no_overlay"]) == 0
    names = sorted(os.listdir(tmp_path / "torch" / "masks"))
    assert len(names) == 3 and sorted(os.listdir(tmp_path / "onnx" / "masks")) == names
    for name in names:
        masks = [np.asarray(Image.open(tmp_path / out / "masks" / name)) for out in ("torch", "onnx")]
        np.testing.assert_array_equal(masks[1], masks[0])
        stem = os.path.splitext(name)[0] + ".npy"
        np.testing.assert_allclose(np.load(tmp_path / "onnx" / "uncertainty" / stem),
                                   np.load(tmp_path / "torch" / "uncertainty" / stem), atol=1e-4)
