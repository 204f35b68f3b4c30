"""Parity with the public upstream code (openai/guided-diffusion, yandex-research/ddpm-segmentation).

tests/fixtures/golden_upstream.pt holds outputs that the upstream code computed for a tiny seeded UNet and
seeded pixel classifiers (scripts/golden/make_golden.py writes it from the two checkouts). Here the same
weights and inputs go through this repository's own entry points: the UNet built from the same flags, the
DDPM feature extractor of create_feature_extractor, the FeatureStore's per-pixel features, and pixel
classifier members loaded from `model_{i}.pth` files in the upstream format, and the numbers must agree.
Everything runs in float32 on the CPU.
"""

import os
from types import SimpleNamespace

import pytest
import torch

from ddpm_seg.backbones import create_feature_extractor
from ddpm_seg.config import validate_experiment
from ddpm_seg.ensemble import predict_logits
from ddpm_seg.feature_store import FeatureStore
from ddpm_seg.interpreter import load_ensemble, member_path
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "golden_upstream.pt")
# Float32 sums round in proportion to the size of what they add up: the absolute tolerance scales with the
# tensor's largest value (our extractor puts all steps through one batched forward, upstream one at a time).
ATOL, RTOL = 1e-5, 1e-4
CPU = torch.device("cpu")


def assert_close(ours, theirs, what):
    ours, theirs = ours.detach().cpu(), theirs.detach().cpu()
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)}, upstream {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype == torch.float32, f"{what}: dtype {ours.dtype}, upstream {theirs.dtype}"
    diff = (ours - theirs).abs()
    bad = diff > ATOL * max(1.0, theirs.abs().max().item()) + RTOL * theirs.abs()
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} values differ from upstream "
                           f"(max abs diff {diff.max().item():.3g}, upstream max abs {theirs.abs().max().item():.3g})")


@pytest.fixture(scope="module")
def golden():
    if not os.path.isfile(FIXTURE):
        pytest.fail(f"{FIXTURE} is missing; write it with scripts/golden/make_golden.py")
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def experiment(golden, tmp_path_factory):
    """An experiment config for the golden settings (validated by our config checks), its DDPM checkpoint
    written as a plain state_dict like the released ones."""
    folder = tmp_path_factory.mktemp("golden")
    model_path = folder / "model.pt"
    torch.save(golden["unet"]["state_dict"], model_path)
    exp = golden["extract"]["experiment"]
    cfg = {
        "exp_dir": str(folder / "runs"), "model_type": exp["model_type"], "number_class": 29, "ignore_label": 0,
        "training_path": str(folder), "testing_path": str(folder), "model_path": str(model_path),
        "dim": list(exp["dim"]), "steps": list(exp["steps"]), "blocks": list(exp["blocks"]), "model_num": 1,
        "batch_size": 64, "training_number": 2, "testing_number": 2, "upsample_mode": exp["upsample_mode"],
        "share_noise": exp["share_noise"], "input_activations": exp["input_activations"],
    }
    return validate_experiment(cfg, "golden experiment"), exp["seed"]


@pytest.fixture(scope="module")
def extractor(golden, experiment):
    cfg, seed = experiment
    torch.manual_seed(1234)  # the shared noise must come from the seed passed below, not from the global RNG
    return create_feature_extractor(cfg, dict(golden["flags"]), CPU, seed=seed, dtype="fp32")


def images(golden):
    return golden["extract"]["images"].numpy()


# ---- the UNet ----

def test_unet_forward_matches_upstream(golden):
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **golden["flags"]})
    model.load_state_dict(golden["unet"]["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        out = model(golden["unet"]["x"], golden["unet"]["t"])
    assert_close(out, golden["unet"]["out"], "UNet output")


# ---- DDPM features ----

def test_shared_noise_is_upstreams(extractor, golden):
    """share_noise draws train_interpreter.py's noise: torch.randn(1, 3, S, S) from a generator seeded with the seed."""
    assert torch.equal(extractor.noise[:1].cpu(), golden["extract"]["noise"])


@pytest.mark.parametrize("index", [0, 1])
def test_activations_match_upstream_per_image(extractor, golden, index):
    maps = extractor(images(golden)[index])
    expected = golden["extract"]["activations"][index]
    assert len(maps) == len(expected)
    for k, (ours, theirs) in enumerate(zip(maps, expected)):
        assert_close(ours, theirs, f"image {index} map {k} (steps x blocks, step-major)")


def test_activations_match_upstream_batched(extractor, golden):
    maps = extractor(images(golden))
    for index, expected in enumerate(golden["extract"]["activations"]):
        for k, (ours, theirs) in enumerate(zip(maps, expected)):
            assert_close(ours[index], theirs, f"batch image {index} map {k}")


def test_features_match_collect_features(extractor, golden, experiment):
    """Per-pixel features from the FeatureStore (what the pixel classifiers train on) equal upstream's
    collect_features: every map upsampled to dim[:2] and concatenated."""
    cfg, _ = experiment
    expected = golden["extract"]["features"]  # [N, dim, H, W]
    num_images, dim, height, width = expected.shape
    assert dim == cfg.dim[-1] and [height, width] == cfg.dim[:2]
    per_image = [extractor(image) for image in images(golden)]
    store = FeatureStore([tuple(m.shape) for m in per_image[0]], (height, width), num_images, dtype=torch.float32)
    for i, maps in enumerate(per_image):
        store.put(i, maps)
    img, ys, xs = (v.reshape(-1) for v in torch.meshgrid(
        torch.arange(num_images), torch.arange(height), torch.arange(width), indexing="ij"))
    ours = store.gather(img, ys, xs)  # [N * H * W, dim]
    assert_close(ours, expected.permute(0, 2, 3, 1).reshape(-1, dim), "per-pixel features")


# ---- pixel classifiers ----

def member_ensemble(entry, folder):
    """A one-member ensemble loaded, through load_ensemble, from model_0.pth in the upstream format."""
    folder.mkdir(exist_ok=True)
    torch.save(entry["checkpoint"], member_path(str(folder), 0))
    cfg = SimpleNamespace(dim=[0, 0, entry["dim"]], number_class=entry["number_class"], model_num=1)
    return load_ensemble(cfg, str(folder), seed=0, device=CPU)


@pytest.mark.parametrize("key", ["c29", "c30"])
def test_member_eval_logits_match_upstream(golden, key, tmp_path):
    entry = golden["classifiers"][key]
    ensemble = member_ensemble(entry, tmp_path / "members")
    assert not ensemble.training
    with torch.no_grad():
        logits = ensemble(entry["features"][None])[0]
    assert_close(logits, entry["logits_eval"], f"{key} eval-mode logits")


@pytest.mark.parametrize("key", ["c29", "c30"])
def test_member_train_mode_matches_upstream(golden, key, tmp_path):
    """One training-mode forward: logits from batch statistics, and the running statistics it leaves."""
    entry = golden["classifiers"][key]
    ensemble = member_ensemble(entry, tmp_path / "members").train()
    with torch.no_grad():
        logits = ensemble(entry["features"][None])[0]
    assert_close(logits, entry["logits_train"], f"{key} train-mode logits")
    state = {k.removeprefix("module."): v for k, v in ensemble.member_state_dict(0).items()}
    for name, theirs in entry["stats_after_train"].items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(state[name], theirs), name
        else:
            assert_close(state[name], theirs, f"{key} {name} after one step")


def test_pixel_logits_match_upstream_evaluation(extractor, golden, tmp_path):
    """Our prediction path (first layer at each map's resolution, then upsampled) on our features gives
    upstream's logits: collect_features, then the member on every pixel's feature row."""
    entry = golden["classifiers"]["c29"]
    ensemble = member_ensemble(entry, tmp_path / "members")
    expected = entry["pixel_logits"]  # [N, H * W, C]
    height, width = golden["extract"]["features"].shape[-2:]
    for index, image in enumerate(images(golden)):
        logits = predict_logits(ensemble, extractor(image), (height, width))  # [1, C, H, W]
        assert_close(logits[0].reshape(entry["number_class"], -1).t(), expected[index], f"image {index} pixel logits")
