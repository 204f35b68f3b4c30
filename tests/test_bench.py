import json
import os
import statistics
import time

import numpy as np
import pytest
import torch

from ddpm_seg.commands import bench
from ddpm_seg.benchmarks.extraction import E2E_SMALL, e2e_features
from ddpm_seg.benchmarks.options import BenchOptions
from ddpm_seg.benchmarks.original import (original_member, original_peak_formula, original_training_set,
                                          predict_original, upsample_concat)
from ddpm_seg.benchmarks.store import build_store
from ddpm_seg.benchmarks.summary import TARGETS, e2e_wall_target, format_table
from ddpm_seg.benchmarks.synthetic import PAPER_BLOCKS, SMALL_CHANNELS, SyntheticTask, make_layout
from ddpm_seg.commands.flags import options_from_flags
from ddpm_seg.ensemble import MLPEnsemble, predict_logits, train_ensemble
from ddpm_seg.feature_store import FeatureStore, PixelSampler
from ddpm_seg.evaluate import majority_vote

E2E_TARGETS = ("e2e_wall", "e2e_peak_rss", "extract_speedup", "e2e_train_speedup")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The whole bench on the tiny layout, every phase in its own spawned process, as the CLI runs it."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    start = time.perf_counter()
    bench.main(["--small", "--n", "3", "--orig-n", "1", "--members", "3", "--train-steps", "10",
                "--predict-runs", "1", "--quality-n", "2", "--quality-test", "1", "--quality-epochs", "2", "--batch", "32",
                "--threads", "1", "--quiet", "--json", str(path)])
    return json.loads(path.read_text()), time.perf_counter() - start


def test_small_bench_reports_every_phase(small_run, capsys):
    r, elapsed = small_run
    for phase in ("store", "train", "predict"):
        for side in ("ours", "original"):
            figures = r[phase][side]
            # Seconds, measured within the bench's own run; resident sizes in bytes (a Python with torch
            # loaded holds more than 50 MB).
            assert 0 < figures["time_s"] < elapsed, (phase, side)
            assert figures["peak_rss"] >= figures["base_rss"] > 50 * 2**20, (phase, side)
    assert r["store"]["ours"]["store_bytes"] == 3 * r["layout"]["store_bytes_per_image"]
    assert r["store"]["original"]["tensor_bytes"] == r["layout"]["full_res_bytes_per_image"]
    assert r["layout"]["features"] == 3 * sum(c for c, _ in PAPER_BLOCKS) // SMALL_CHANNELS
    # Throughput: every member's pixels of every timed step over the timed seconds (ours at --batch, the
    # original at its batch of 64).
    assert r["train"]["ours"]["pixels_per_s"] == pytest.approx(3 * 32 * 10 / r["train"]["ours"]["time_s"])
    assert r["train"]["original"]["pixels_per_s"] == pytest.approx(3 * 64 * 10 / r["train"]["original"]["time_s"])
    # The original's figure for N = 3 images: the printed formula applied to the base measured at N = 1.
    g = r["train"]["original"]
    assert g["peak_rss_computed"] == g["base_rss"] + 2 * 3 * r["layout"]["full_res_bytes_per_image"]
    assert r["store"]["original"]["time_s_computed"] == pytest.approx(3 * r["store"]["original"]["time_s"])
    # Speedups as the table states them: training throughput ours / original, prediction time original / ours.
    train, predict = r["train"], r["predict"]
    assert train["speedup"] == pytest.approx(train["ours"]["pixels_per_s"] / train["original"]["pixels_per_s"])
    assert predict["speedup"] == pytest.approx(predict["original"]["time_s"] / predict["ours"]["time_s"])
    # Same members, same image: the two prediction paths must give the same labels.
    assert r["predict"]["agreement"] >= 0.999 and r["targets"]["predict_agreement"]["met"]
    q = r["quality"]
    assert q["miou_ours"] > q["miou_chance"] + 0.1 and q["miou_original"] > q["miou_chance"] + 0.1
    assert set(r["targets"]) == set(TARGETS) - set(E2E_TARGETS)


def test_table_has_a_row_per_phase(small_run):
    r, _ = small_run
    table = format_table(r)
    lines = table.splitlines()
    assert lines[0] == f"CPU: {r['cpu']}" and lines[1].startswith("phase")
    assert [line.split()[0] for line in lines[3:]] == list(bench.DEFAULT_PHASES)


def test_original_formula():
    # [N, D, H, W] + its reshape copy (2N), or N + 2 while filling when N is 1.
    assert original_peak_formula(100, 10, 50) == 100 + 10 * 100
    assert original_peak_formula(100, 10, 1) == 100 + 10 * 3


def test_original_paths_match_ours_numerically():
    """The original's training set and prediction, built from the same synthetic maps, agree with the
    FeatureStore gather and predict_logits (what the bench's comparison relies on)."""
    torch.manual_seed(0)
    shapes, size = [(6, 4, 4), (5, 8, 8)], (16, 16)
    task = SyntheticTask(shapes, size, num_classes=3, seed=1)
    start = time.perf_counter()
    X, y, seconds = original_training_set(task, [0, 1], progress=False)
    elapsed = time.perf_counter() - start
    store, labels, _ = build_store(task, [0, 1], progress=False)
    assert X.shape == (2 * 16 * 16, 11) and 0 < seconds <= elapsed and torch.equal(y.long(), labels.flatten())
    pix = torch.arange(2 * 16 * 16)
    img, rest = pix // 256, pix % 256
    gathered = store.gather(img, rest // 16, rest % 16)
    assert torch.allclose(X, gathered, atol=2e-3)  # the store holds float16

    ensemble = MLPEnsemble(11, 3, 3, seed=0)
    maps = task.maps(5)
    ours = majority_vote(predict_logits(ensemble, maps, size))
    nets = [original_member(ensemble, m).eval() for m in range(3)]
    assert (predict_original(nets, maps, size) == ours).float().mean() > 0.99
    x = upsample_concat(maps, size).view(11, -1).t()
    assert torch.allclose(nets[1](x), ensemble.eval()(x.expand(3, -1, -1))[1], atol=1e-5)


def test_synthetic_task_is_deterministic_and_labels_follow_the_teacher():
    shapes, size = make_layout(small=True)
    task = SyntheticTask(shapes, size, num_classes=4, seed=0)
    a, b = task.maps(7), SyntheticTask(shapes, size, 4, seed=0).maps(7)
    assert [tuple(m.shape) for m in a] == shapes and all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], task.maps(8)[0])
    # Labels = argmax of the teacher on the full-resolution features.
    full = upsample_concat(a, size)
    weight = torch.cat(task.teacher, dim=1)
    expected = torch.einsum("kd,dhw->khw", weight, full).argmax(0)
    assert (task.labels(a) == expected).float().mean() > 0.999
    assert task.labels(a).unique().numel() > 1


def test_fixed_steps_train_every_member_exactly_that_many_steps():
    labels = torch.randint(0, 3, (1, 8, 8))
    store = FeatureStore([(4, 4, 4)], (8, 8), 1)
    store.put(0, [torch.randn(4, 4, 4)])
    stats = train_ensemble(MLPEnsemble(4, 3, 2), store, PixelSampler(labels), seed=0, batch_size=16, steps=9,
                           progress=False)
    assert [s["steps"] for s in stats.values()] == [9, 9] and stats[0]["epoch"] == 2  # 64 pixels: 4 batches an epoch


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--phases", "store,nope"])
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--n", "0"])
    assert bench.build_parser().parse_args(["--phases", "train, predict"]).phases == ["train", "predict"]


def test_e2e_runs_train_interpreter_end_to_end_at_toy_size(tmp_path):
    """The e2e phase on a tiny UNet: train-interpreter really ran (members trained, mIoU scored), and the
    original's figures are the printed formulas applied to its measured forward and training speed."""
    path = tmp_path / "e2e.json"
    start = time.perf_counter()
    bench.main(["--phases", "e2e", "--small", "--n", "2", "--test_n", "2", "--members", "2", "--train-steps", "5",
                "--predict-runs", "1", "--batch", "256", "--extract_dtype", "fp32", "--threads", "1", "--quiet",
                "--json", str(path)])
    elapsed = time.perf_counter() - start
    r = json.loads(path.read_text())
    e, ours, orig = r["e2e"], r["e2e"]["ours"], r["e2e"]["original"]
    # Seeded data, UNet and members: the mIoU is the same on every run (measured 0.01144 over 29 classes; a
    # random-init UNet on 2 images). A band of 0.2 points around it.
    assert ours["miou"] == pytest.approx(0.01144, abs=0.002)
    # The child's phases lie within its wall time, which lies within this call; its peak RSS is in bytes (a
    # Python with torch loaded holds more than 100 MB, less than 8 GB at this size).
    assert ours["extract_train_s"] + ours["train_ensemble_s"] + ours["evaluate_s"] < ours["wall_s"] < elapsed
    assert 100 * 2**20 < ours["child_peak_rss"] < 8 * 2**30
    assert "train-interpreter" in ours["command"] and "--random_init" in ours["command"]
    assert ours["extract_batch"] == 1 and len(ours["member_steps"]) == 2 and min(ours["member_steps"]) > 0
    for key in ("extract_train_s", "train_ensemble_s", "evaluate_s"):
        assert ours[key] > 0
    steps = len(E2E_SMALL["steps"])
    assert orig["extract_train_s"] == pytest.approx(2 * steps * orig["forward_s"])
    assert orig["evaluate_s"] == pytest.approx(2 * steps * orig["forward_s"])
    # The original is billed the shortest run of its stopping rule: 4 epochs over every labelled pixel and 51 steps.
    assert ours["labelled_pixels"] == 2 * 32 * 32 and ours["batch_size"] == 256
    assert e["pixel_presentations"]["original"] == 2 * (4 * ours["labelled_pixels"] + 51 * 64)
    assert orig["train_ensemble_s"] == pytest.approx(e["pixel_presentations"]["original"] / orig["train_pixels_per_s"])
    assert e["pixel_presentations"]["ours"] == sum(ours["member_steps"]) * 256
    assert "--recipe fast" in ours["command"] and 0 < ours["project_s"] < ours["train_ensemble_s"]
    # The fast recipe: 4 epochs of the finest map's share of the pixels (block 5 of the tiny UNet is at the
    # image's 32x32: all 2048, 8 steps of 256) and 51 steps.
    assert ours["member_steps"] == [4 * 8 + 51] * 2
    assert e["extract_speedup"] == pytest.approx(steps * orig["forward_s"] / (ours["extract_train_s"] / 2))
    assert set(E2E_TARGETS) <= set(r["targets"])
    table = format_table(r).splitlines()
    assert table[0] == f"CPU: {r['cpu']}" and [line.split()[0] for line in table[3:]] == ["e2e"] * 5
    # 4 of bedroom_28's 60 images on a CPU without AMX: 4/60 of 30 minutes.
    assert r["targets"]["e2e_wall"]["target"] == f"<= {e2e_wall_target(r):g}"
    assert e2e_wall_target(dict(r, cpu="x (avx2)")) == pytest.approx(120)
    assert e2e_wall_target(dict(r, cpu="x (amx_bf16)")) == pytest.approx(40)


def test_e2e_feature_count_is_the_papers():
    args = bench.build_parser().parse_args(["--phases", "e2e"])
    args.small = False
    assert e2e_features(args) == 8448  # 3 steps x (1024 + 512 + 512 + 512 + 256)


def test_diffusers_phase_measures_each_arch_in_each_dtype(tmp_path, monkeypatch, capsys):
    """`--phases diffusers` on a tiny SD-shaped UNet: the maps' shapes and FLOPs from the meta forward, and a
    timed row per dtype, printed and in the JSON; no summary table, as no phase of it ran."""
    pytest.importorskip("diffusers", reason="the diffusers extra: pip install -e '.[diffusers]'")
    from ddpm_seg.benchmarks import stable_diffusion
    unet = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, attention_head_dim=4,
                norm_num_groups=4)
    vae = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    blocks = ["up_blocks.0", "up_blocks.1.attentions.0"]
    monkeypatch.setitem(stable_diffusion.ARCHS, "tiny", (unet, vae, {"encoder_hidden_states": (77, 24)}, blocks))
    path = tmp_path / "diffusers.json"
    bench.main(["--phases", "diffusers", "--archs", "tiny", "--size", "64", "--steps", "10,20", "--images", "2",
                "--warmup", "1", "--threads", "1", "--json", str(path)])
    out = capsys.readouterr().out
    d = json.loads(path.read_text())["diffusers"]
    # The tiny VAE downsamples once: a 64x64 image is a 32x32 latent; both blocks' maps, at each step.
    assert d["features"]["tiny"]["map_shapes"] == [[32, 32, 32], [16, 32, 32]] * 2
    assert d["features"]["tiny"]["flops"] > 0 and d["size"] == 64 and d["steps"] == [10, 20]
    assert [(r["arch"], r["dtype"], len(r["times_s"])) for r in d["results"]] == [("tiny", "float32", 2),
                                                                                  ("tiny", "bfloat16", 2)]
    assert "96 features per pixel" in out and "seconds per 64x64 image (median of 2), 1 threads:" in out
    assert not any(line.startswith("phase") for line in out.splitlines())
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--phases", "diffusers", "--archs", "sd15,nope"])


def test_students_phase_times_the_demo_interpreter_beside_students(tmp_path, capsys):
    """`--phases students`: the demo interpreter as the demo runs it, then a student in PyTorch and onnxruntime,
    each timed on the same images; the speed-ups are the interpreter's time over each row's, and the ONNX
    student labels the timed images as the PyTorch one does."""
    pytest.importorskip("onnxruntime", reason="the onnx extra: pip install -e '.[onnx]'")
    path = tmp_path / "students.json"
    bench.main(["--phases", "students", "--predict_runs", "2", "--warmup", "1", "--students", "lraspp_mobilenet_v3",
                "--student_res", "64", "--threads", "2", "--quiet", "--json", str(path)])
    assert torch.get_num_threads() == 1  # given back: later tests compare float sums with one-thread processes
    out = capsys.readouterr().out
    s = json.loads(path.read_text())["students"]
    rows = s["rows"]
    assert [(r["model"], r["runtime"]) for r in rows] == [("demo interpreter", "pytorch"),
                                                          ("lraspp_mobilenet_v3", "pytorch"),
                                                          ("lraspp_mobilenet_v3", "onnxruntime")]
    # The demo experiment's interpreter: 8 test views, 10 members, on 32x32 images.
    assert (s["interpreter_views"], s["interpreter_members"], s["image_size"]) == (8, 10, 32)
    assert s["onnx_note"] is None and s["threads"] == 2 and s["student_res"] == 64
    interpreter_s = rows[0]["time_s"]
    for r in rows:
        assert len(r["times_s"]) == 2 and min(r["times_s"]) > 0
        assert r["time_s"] == statistics.median(r["times_s"])
        assert r["ms_per_image"] == 1000 * r["time_s"] and r["images_per_s"] == 1 / r["time_s"]
        assert r["speedup"] == interpreter_s / r["time_s"]
    assert rows[0]["speedup"] == 1
    onnx = rows[2]
    assert onnx["label_agreement"] >= 0.999 and onnx["max_abs_logit_diff"] < 1e-3
    table = out[out.index("prediction per 32x32 demo image"):].splitlines()
    assert table[1].split() == ["model", "runtime", "ms/image", "images/s", "speed-up"]
    assert [line.split()[0] for line in table[2:5]] == ["demo", "lraspp_mobilenet_v3", "lraspp_mobilenet_v3"]
    assert not any(line.startswith("phase") for line in out.splitlines())


def test_students_label_images_variously_and_without_onnx_say_so(monkeypatch, capsys):
    """The random students' labels vary over an image (their BatchNorm statistics are the images'), which is
    what makes the ONNX agreement a check; without the onnx extra the phase has PyTorch rows and says why."""
    from ddpm_seg.benchmarks import students
    from ddpm_seg.demo import DemoOptions, demo_config
    from ddpm_seg.demo_data import render_scene
    cfg, _ = demo_config(DemoOptions())
    rng = np.random.default_rng(0)
    images = [render_scene(rng, 32)[0] for _ in range(4)]
    torch.manual_seed(0)
    student = students.random_student("deeplabv3_mobilenet_v3", cfg, 64, images)
    assert not student.model.training
    assert all(np.unique(labels).size > 1 for labels, _, _ in student.segment(images))

    # A student stands in for the interpreter, so that this checks the phase's rows, not the interpreter's time.
    monkeypatch.setattr(students, "demo_interpreter", lambda seed: (student, "fp32"))
    monkeypatch.setattr(students, "ONNX_MODULES", ("onnxruntime", "no_such_module_here"))
    args = bench.build_parser().parse_args(["--phases", "students", "--predict_runs", "1", "--warmup", "0",
                                            "--students", "lraspp_mobilenet_v3", "--student_res", "32"])
    opts = options_from_flags(BenchOptions, args, n=1, batch=1, e2e_n=1, e2e_batch=None)
    s = students.measure(opts, lambda *a, **k: None)
    assert [(r["model"], r["runtime"]) for r in s["rows"]] == [("demo interpreter", "pytorch"),
                                                               ("lraspp_mobilenet_v3", "pytorch")]
    assert s["onnx_note"] == students.NO_ONNX and f"onnxruntime: {students.NO_ONNX}" in capsys.readouterr().out
    for flags in (["--students", "lraspp_mobilenet_v3,nope"], ["--student_res", "16"]):
        with pytest.raises(SystemExit):
            bench.build_parser().parse_args(flags)


def test_backbones_phase_times_each_config_in_each_dtype(tmp_path, monkeypatch, capsys):
    """`--phases backbones` on narrow versions of a shipped ALAE and GAN Inversion config: a row per config and
    dtype, the backbone's feature count, and for GAN Inversion the time per projector step and the config's own
    steps at that rate (its LPIPS weights random, its steps --inversion_steps)."""
    from ddpm_seg.backbones import alae, stylegan2
    for name, arch in list(alae.ARCHITECTURES.items()):
        monkeypatch.setitem(alae.ARCHITECTURES, name, dict(arch, start_channels=4, max_channels=8, latent_size=8))
    for name, arch in list(stylegan2.ARCHITECTURES.items()):
        monkeypatch.setitem(stylegan2.ARCHITECTURES, name, dict(arch, z_dim=8, w_dim=8, mapping_layers=2,
                                                                channel_max=8))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    configs = [os.path.join(repo, "experiments", "bedroom_28", "alae.json"),
               os.path.join(repo, "experiments", "horse_21", "gan_inversion.json")]
    path = tmp_path / "backbones.json"
    bench.main(["--phases", "backbones", "--configs", ",".join(configs), "--images", "1", "--warmup", "0",
                "--inversion_steps", "2", "--threads", "2", "--quiet", "--json", str(path)])
    assert torch.get_num_threads() == 1  # given back
    rows = json.loads(path.read_text())["backbones"]["results"]
    assert [(os.path.basename(r["config"]), r["dtype"]) for r in rows] == [
        ("alae.json", "float32"), ("alae.json", "bfloat16"), ("gan_inversion.json", "float32"),
        ("gan_inversion.json", "bfloat16")]
    # Narrow ALAE bedroom: blocks 0-6 at min(8, 4 * 2^(6 - i)) channels; StyleGAN2: 8 channels at 4..256.
    assert [r["features"] for r in rows] == [6 * 8 + 4] * 2 + [7 * 8] * 2
    for r in rows:
        assert len(r["times_s"]) == 1 and r["median_s"] == statistics.median(r["times_s"])
    for r in rows[2:]:
        assert r["inversion_steps"] == 2 and r["config_steps"] == 1000
        assert r["step_s"] == r["median_s"] / 2 and r["config_steps_s"] == r["step_s"] * 1000
    out = capsys.readouterr().out
    assert "2 projector steps" in out and "min for the config's 1000" in out
