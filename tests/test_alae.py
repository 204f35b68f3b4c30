"""ALAE backbone: the released checkpoint format and architectures vs the key listings, block maps against a
computation by hand of the encoder and generator, noise, config checks, and train-interpreter end to end.

Models that compute are small (the release's block structure, fewer blocks, narrow widths); the paper-size
models are only built on the meta device.
"""

import math
import os
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddpm_seg.backbones import alae, create_feature_extractor
from ddpm_seg.backbones.alae import ALAEFeatureExtractor, build_alae, feature_blocks
from ddpm_seg.config import load_experiment, validate_experiment
from guided_diffusion.checkpoint import CheckpointError
from interpreter_runs import train_interpreter

REPO = Path(__file__).resolve().parent.parent
KEYS = REPO / "tests" / "fixtures" / "keys"
DATASETS = {"bedroom_28": "bedroom", "ade_bedroom_30": "bedroom", "ffhq_34": "ffhq", "celeba_19": "ffhq"}
PAPER_FEATURES = {"ffhq": 2496, "bedroom": 2016, "celeba-hq256": 2496}  # blocks 0-6 (4..256 pixels)
SIZE = 64  # image side of the small models and the end-to-end data
# Small models: "bedroom" encodes 64x64 images (no fused resampling); "ffhq" encodes 128x128, so 64x64 images
# are upsampled, its top block is above their resolution, and its 128-pixel blocks use fused resampling.
TINY = {"bedroom": dict(layer_count=5, start_channels=8, max_channels=16, latent_size=16),
        "ffhq": dict(layer_count=6, start_channels=2, max_channels=16, latent_size=16)}
TINY_FEATURES = {"bedroom": 16 * 4 + 8, "ffhq": 16 * 3 + 8 + 4}  # blocks 0-4 (4..64 pixels)


def read_listing(path):
    """[(key, shape string)] of a key listing, in file order."""
    with open(path) as f:
        return [tuple(line.rstrip("\n").split("\t")) for line in f if not line.startswith("#")]


def listing(state_dict, prefix=""):
    return [(prefix + k, ",".join(str(s) for s in v.shape)) for k, v in state_dict.items()]


@pytest.fixture
def tiny(monkeypatch):
    for name, arch in TINY.items():
        monkeypatch.setitem(alae.ARCHITECTURES, name, arch)


@pytest.fixture
def tracker_module(monkeypatch):
    """The training code's `tracker` module, as far as its pickled loss-tracker objects go."""
    module = types.ModuleType("tracker")

    class RunningMean:
        pass

    class RunningMeanTorch:
        pass

    for cls in (RunningMean, RunningMeanTorch):
        cls.__module__, cls.__qualname__ = "tracker", cls.__name__
        setattr(module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "tracker", module)
    return module


def randomised(encoder, generator, seed=0):
    """Every parameter and buffer random, so a tensor that is skipped or misloaded shows in the maps."""
    generator_ = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (encoder, generator):
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                t.copy_(torch.randn(t.shape, generator=generator_) * (0.3 if "weight" in name else 0.2))
    return encoder.eval(), generator.eval()


def release(encoder, generator, tracker):
    """A file in the release's format: ALAE's Checkpointer dict, with the smoothed and training models, the
    mapping networks, the dlatent average and the auxiliary optimiser, scheduler and loss-tracker states."""
    mapping = {"map_blocks.0.weight": torch.randn(4, 4), "map_blocks.0.bias": torch.randn(4)}
    loss = tracker.RunningMeanTorch()
    loss.values = [torch.tensor([0.5]), torch.tensor([0.25])]
    lae = tracker.RunningMean()
    lae._mean, lae.n = 0.125, 3
    optimiser = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}},
                 "param_groups": [{"lr": 0.0015, "betas": (0.0, 0.99), "eps": 1e-8, "params": [0]}]}
    return {
        "models": {"discriminator_s": encoder.state_dict(), "generator_s": generator.state_dict(),
                   "mapping_tl_s": mapping, "mapping_fl_s": mapping, "dlatent_avg": {"buff": torch.randn(10, 16)},
                   "discriminator": encoder.state_dict(), "generator": generator.state_dict()},
        "auxiliary": {"encoder_optimizer": optimiser, "decoder_optimizer": optimiser,
                      "scheduler": {"encoder_optimizer": {"last_epoch": 157}},
                      "tracker": {"tracks": OrderedDict(loss_d=loss, lae=lae), "epochs": [1.0, 2.0],
                                  "means_over_epochs": OrderedDict(loss_d=[0.5, 0.4], lae=[None, 0.1])}},
    }


@pytest.fixture
def released(tmp_path, tiny, tracker_module):
    """Small random-weight checkpoints in the release's format: {alae_config: (path, encoder, generator)}."""
    files = {}
    for i, (name, arch) in enumerate(TINY.items()):
        encoder, generator = randomised(*build_alae(**arch), seed=i)
        path = tmp_path / f"{name}.pth"
        torch.save(release(encoder, generator, tracker_module), path)
        files[name] = (path, encoder, generator)
    return files


def config(name, model_path, size=SIZE, **overrides):
    return {"exp_dir": "unused", "model_type": "alae", "alae_config": name, "number_class": 3, "ignore_label": 255,
            "training_path": "unused", "testing_path": "unused", "model_path": str(model_path),
            "dim": [size, size, TINY_FEATURES[name]], "steps": [], "blocks": [], "model_num": 2, "batch_size": 64,
            "training_number": 2, "testing_number": 2, "upsample_mode": "bilinear", "share_noise": True,
            "input_activations": False, **overrides}


def build(cfg, seed=0, random_init=False, dtype="fp32"):
    return create_feature_extractor(validate_experiment(cfg), {}, torch.device("cpu"), seed=seed,
                                    random_init=random_init, dtype=dtype)


def random_image(size=SIZE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- architectures vs the released files


@pytest.mark.parametrize("name", sorted(alae.ARCHITECTURES))
def test_encoder_and_generator_keys_match_the_release_listing_line_by_line(name):
    with torch.device("meta"):
        encoder, generator = build_alae(**alae.ARCHITECTURES[name])
    reference = read_listing(KEYS / f"alae_{name}.txt")
    ours = listing(encoder.state_dict(), "discriminator_s.") + listing(generator.state_dict(), "generator_s.")
    assert reference[:len(ours)] == ours
    assert {k.split(".")[0] for k, _ in reference[len(ours):]} == {"mapping_tl_s", "mapping_fl_s", "dlatent_avg"}


def test_paper_feature_layouts_on_the_meta_device():
    sides = [4, 8, 16, 32, 64, 128, 256]
    widths = {"ffhq": [512, 512, 512, 512, 256, 128, 64], "bedroom": [512, 512, 512, 256, 128, 64, 32],
              "celeba-hq256": [512, 512, 512, 512, 256, 128, 64]}
    for name, channels in widths.items():
        with torch.device("meta"):
            encoder, generator = build_alae(**alae.ARCHITECTURES[name])
        blocks = feature_blocks([], alae.ARCHITECTURES[name]["layer_count"], 256)
        maps = ALAEFeatureExtractor(encoder, generator, blocks, 0, True)(random_image(256))
        assert [tuple(m.shape) for m in maps] == [(c, s, s) for c, s in zip(channels, sides)]
        assert sum(channels) == PAPER_FEATURES[name]
    assert encoder.resolution == 256 and build_alae(**alae.ARCHITECTURES["ffhq"])[0].resolution == 1024


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_paper_configs_follow_the_ddpm_config(dataset):
    ddpm = load_experiment(str(REPO / "experiments" / dataset / "ddpm.json"))
    cfg = load_experiment(str(REPO / "experiments" / dataset / "alae.json"))
    name = DATASETS[dataset]
    assert cfg.to_dict() == dict(ddpm.to_dict(), model_type="alae", alae_config=name,
                                 exp_dir=f"pixel_classifiers/{dataset}/alae", model_path=f"checkpoints/alae/{name}.pth",
                                 dim=[256, 256, PAPER_FEATURES[name]], steps=[], blocks=list(range(7)),
                                 input_activations=False)


# ---------------------------------------------------------------- block maps, by hand


def leaky(x):
    return torch.where(x >= 0, x, 0.2 * x)


def normalised(x, eps):
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def blurred(x, kernel):
    """Depthwise 3x3 filter with the stored kernel (the release's is [1, 2, 1] x [1, 2, 1] / 16; the test's
    files hold random ones, so that a kernel that is not loaded shows)."""
    return F.conv2d(x, kernel, padding=1, groups=x.shape[1])


def latent_by_hand(sd, x):
    """EncoderDefault.encode at full resolution, from the state_dict, with resampling unfused: a 3x3 conv then a
    2x2 mean."""
    x = leaky(leaky(F.conv2d(x, sd["from_rgb.0.from_rgb.weight"], sd["from_rgb.0.from_rgb.bias"])))
    latent = 0
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("encode_block.")})):
        p = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith(f"encode_block.{i}.")}
        x = leaky(F.conv2d(x, p["conv_1.weight"], padding=1) + p["bias_1"])
        stats_1 = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3), unbiased=False)], dim=1)
        x = F.conv2d(blurred(normalised(x, 1e-5), p["blur.weight"]), p["conv_2.weight"], padding=1)
        x = leaky(F.avg_pool2d(x, 2) + p["bias_2"])
        stats_2 = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3), unbiased=False)], dim=1)
        x = normalised(x, 1e-5)
        latent = latent + stats_1 @ p["style_1.weight"].T + p["style_1.bias"] + stats_2 @ p["style_2.weight"].T \
            + p["style_2.bias"]
    return latent


def block_maps_by_hand(sd, latent, noise, count):
    """Outputs of generator blocks 0..count-1, from the state_dict, with resampling unfused: nearest 2x
    upsampling then a 3x3 conv (a transposed conv's kernel swapped and flipped)."""
    x = sd["const"].expand(latent.shape[0], -1, -1, -1)
    maps = []
    for i in range(count):
        p = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith(f"decode_block.{i}.")}
        if i > 0:
            kernel = p["conv_1.weight"]
            if 4 * 2 ** i >= 128:  # stored as a transposed conv [in, out, 3, 3]
                kernel = kernel.transpose(0, 1).flip(-1, -2)
            x = blurred(F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), kernel, padding=1), p["blur.weight"])
        for j, conv in ((1, None), (2, p["conv_2.weight"])):
            if conv is not None:
                x = F.conv2d(x, conv, padding=1)
            x = leaky(x + p[f"noise_weight_{j}"] * noise[i][j - 1] + p[f"bias_{j}"])
            style = latent @ p[f"style_{j}.weight"].T + p[f"style_{j}.bias"]
            scale, shift = style.chunk(2, dim=1)
            x = normalised(x, 1e-8) * (1 + scale[..., None, None]) + shift[..., None, None]
        maps.append(x)
    return maps


@pytest.mark.parametrize("name", ["bedroom", "ffhq"])
def test_block_maps_are_the_generator_blocks_for_the_encoded_latent(released, name):
    path, encoder, generator = released[name]
    extractor = build(config(name, path))
    images = np.stack([random_image(seed=1), random_image(seed=2)])
    maps = extractor(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    resolution = 2 ** (TINY[name]["layer_count"] + 1)
    if resolution != SIZE:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    with torch.no_grad():
        latent = latent_by_hand(encoder.state_dict(), x)
        expected = block_maps_by_hand(generator.state_dict(), latent, alae.shared_noise_maps(0, 4), 5)
    assert [tuple(m.shape) for m in maps] == [(2, m.shape[1], 4 * 2 ** i, 4 * 2 ** i) for i, m in enumerate(expected)]
    assert sum(m.shape[1] for m in maps) == TINY_FEATURES[name]
    # The random weights give maps up to ~100: float32 rounding differs by ~1e-6 of that.
    for ours, theirs in zip(maps, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())
    # One image alone gets its maps of the batch.
    torch.testing.assert_close(extractor(images[1])[-1], maps[-1][1], rtol=1e-4, atol=1e-5 * maps[-1].abs().max().item())


def test_fused_resampling_runs_at_128_pixels_and_above(tiny):
    encoder, generator = build_alae(**TINY["ffhq"])
    assert isinstance(encoder.encode_block[0].conv_2, alae.DownsamplingConv)
    assert not isinstance(encoder.encode_block[1].conv_2, alae.DownsamplingConv)
    assert isinstance(generator.decode_block[5].conv_1, alae.UpsamplingConv)
    assert not isinstance(generator.decode_block[4].conv_1, alae.UpsamplingConv)


def test_blocks_are_read_in_the_order_listed(released):
    path, _, _ = released["bedroom"]
    image = random_image()
    every = build(config("bedroom", path))(image)
    chosen = build(config("bedroom", path, dim=[SIZE, SIZE, 32], blocks=[1, 3]))(image)
    assert [m.shape for m in chosen] == [every[1].shape, every[3].shape]
    assert torch.equal(chosen[0], every[1]) and torch.equal(chosen[1], every[3])


# ---------------------------------------------------------------- noise


def test_shared_noise_is_fixed_by_the_seed(released):
    path, _, _ = released["bedroom"]
    image = random_image()
    first, again = build(config("bedroom", path))(image), build(config("bedroom", path))(image)
    other_seed = build(config("bedroom", path), seed=1)(image)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[-1], other_seed[-1])
    # Fewer blocks read: the same noise for those read.
    assert torch.equal(build(config("bedroom", path, dim=[SIZE, SIZE, 16], blocks=[2]))(image)[0], first[2])


def test_per_image_noise_depends_on_the_image_only(released):
    path, _, _ = released["bedroom"]
    extractor = build(config("bedroom", path, share_noise=False))
    a, b = random_image(seed=1), random_image(seed=2)
    alone = extractor(a)
    in_batch = extractor(np.stack([b, a]))
    for single, batched in zip(alone, in_batch):
        torch.testing.assert_close(single, batched[1], rtol=1e-4, atol=1e-5 * single.abs().max().item())
    assert all(torch.equal(x, y) for x, y in zip(alone, extractor(a, view=1)))
    assert not torch.equal(alone[-1], build(config("bedroom", path))(a)[-1])  # not the shared noise


def test_bfloat16_extraction_returns_float32_maps_close_to_float32(released):
    path, _, _ = released["ffhq"]
    image = random_image()
    exact = build(config("ffhq", path))(image)
    rounded = build(config("ffhq", path), dtype="bf16")(image)
    for a, b in zip(exact, rounded):
        assert b.dtype == torch.float32
        assert (a - b).abs().mean() < 0.1 * a.abs().mean()


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize("overrides, message", [
    (dict(alae_config="ffhq-1024"), r"'alae_config' must be one of \['bedroom', 'celeba', 'celeba-hq256', 'ffhq'\], "
                                    r"got 'ffhq-1024'"),
    (dict(blocks=[5]), r"alae_config 'ffhq': block 5 works at 128x128, above the 64x64 images \(dim\); "
                       r"read blocks 0-4"),
    (dict(blocks=[6]), r"alae_config 'ffhq': block 6 does not exist: the generator has blocks 0-5"),
    (dict(input_activations=True), r"input_activations is not supported for model_type 'alae'"),
    (dict(dim=[64, 32, 60]), r"ALAE encodes square images; dim \[64, 32\] is not square"),
])
def test_unusable_config_values_are_refused_in_one_line(tiny, overrides, message):
    with pytest.raises(ValueError, match=r"^x.json: " + message) as e:
        validate_experiment(config("ffhq", "unused.pth", **overrides), "x.json")
    assert "\n" not in str(e.value)


def test_alae_config_is_required(tiny):
    cfg = config("ffhq", "unused.pth")
    del cfg["alae_config"]
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['alae_config'\]"):
        validate_experiment(cfg)


def test_a_wrong_feature_count_names_the_right_one(released, tmp_path, capsys):
    """dim[-1] must be the channels of the blocks read."""
    from ddpm_seg.training import check_feature_size

    path, _, _ = released["ffhq"]
    cfg = validate_experiment(config("ffhq", path, dim=[SIZE, SIZE, 99]))
    maps = create_feature_extractor(cfg, {}, torch.device("cpu"))(random_image())
    with pytest.raises(ValueError, match=f"set dim\\[-1\\] to {TINY_FEATURES['ffhq']}"):
        check_feature_size(cfg, maps, "x.json")


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ["bedroom", "ffhq"])
def test_released_checkpoints_load_strictly(released, name):
    path, encoder, generator = released[name]
    extractor = build(config(name, path))
    for ours, saved in ((extractor.encoder, encoder), (extractor.generator, generator)):
        loaded = ours.state_dict()
        assert list(loaded) == list(saved.state_dict())
        assert all(torch.equal(loaded[k], v) for k, v in saved.state_dict().items())
        assert not ours.training
    image = random_image()
    assert not torch.equal(extractor(image)[-1], build(config(name, path), seed=0, random_init=True)(image)[-1])


def test_a_legacy_format_file_loads_too(released, tracker_module, tmp_path):
    """Files written by torch before 1.6 are a pickle stream, not a zip archive."""
    path, encoder, _ = released["bedroom"]
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(path, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    assert not legacy.read_bytes().startswith(b"PK")
    loaded = build(config("bedroom", legacy)).encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in encoder.state_dict().items())


def test_random_init_is_seeded_and_needs_no_checkpoint(tiny, tmp_path):
    cfg = config("ffhq", tmp_path / "nonexistent.pth")
    first, again, other = (build(cfg, seed, random_init=True) for seed in (3, 3, 4))
    state = [e.generator.state_dict() | {"e." + k: v for k, v in e.encoder.state_dict().items()}
             for e in (first, again, other)]
    assert all(torch.equal(state[0][k], state[1][k]) for k in state[0])
    assert not all(torch.equal(state[0][k], state[2][k]) for k in state[0])
    # The release's initialisation: constant 1, zero biases and noise weights, N(0, gain / sqrt(fan_in)) weights.
    block = first.generator.decode_block[2]
    assert torch.equal(first.generator.const, torch.ones_like(first.generator.const))
    assert not block.bias_1.any() and not block.noise_weight_2.any()
    assert math.isclose(block.conv_2.weight.std().item(), math.sqrt(2 / (9 * 16)), rel_tol=0.2)


@pytest.mark.parametrize("entry, edit, message", [
    ("generator_s", lambda sd: sd.update({"extra.weight": torch.zeros(2)}),
     r"models\['generator_s'\] does not match alae_config 'bedroom':\n  unexpected keys \(1\):\n    extra.weight$"),
    ("discriminator_s", lambda sd: sd.pop("encode_block.3.style_2.bias"),
     r"models\['discriminator_s'\] does not match.*\n  missing keys \(1\):\n    encode_block.3.style_2.bias$"),
    ("generator_s", lambda sd: sd.update({"const": torch.ones(1, 16, 8, 8)}),
     r"models\['generator_s'\] .*\n  shape mismatches \(1\):\n    const: checkpoint \(1, 16, 8, 8\) vs model \(1, 16, 4, 4\)$"),
])
def test_wrong_keys_and_shapes_are_named(released, tracker_module, tmp_path, entry, edit, message):
    path, _, _ = released["bedroom"]
    checkpoint = torch.load(path, weights_only=False)
    edit(checkpoint["models"][entry])
    torch.save(checkpoint, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=rf"(?s)^ALAE checkpoint '.*bad.pth': {message}"):
        build(config("bedroom", tmp_path / "bad.pth"))


def test_another_alae_configs_file_says_which_it_is(released):
    path, _, _ = released["bedroom"]
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*probable cause: the file holds an alae_config "
                                              r"'bedroom' model, not 'ffhq'"):
        build(config("ffhq", path))


def test_wrong_truncated_or_missing_files_fail_clearly(released, tmp_path):
    path, encoder, _ = released["bedroom"]
    flat = tmp_path / "flat.pth"
    torch.save(encoder.state_dict(), flat)
    with pytest.raises(CheckpointError, match=r"flat.pth' is not usable: expected \{'models': \{'discriminator_s': "
                                              r"state_dict, 'generator_s': state_dict, ...\}\} as ALAE's Checkpointer"):
        build(config("bedroom", flat))
    no_generator = tmp_path / "no_generator.pth"
    torch.save({"models": {"discriminator_s": encoder.state_dict(), "generator": {}}}, no_generator)
    with pytest.raises(CheckpointError, match=r"no_generator.pth' is not usable: .* but 'models' has no state_dict "
                                              r"'generator_s' \(its entries: \['discriminator_s', 'generator'\]\)"):
        build(config("bedroom", no_generator))
    truncated = tmp_path / "truncated.pth"
    data = path.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth' is not a readable PyTorch checkpoint"):
        build(config("bedroom", truncated))
    with pytest.raises(FileNotFoundError, match="missing.pth' does not exist"):
        build(config("bedroom", tmp_path / "missing.pth"))


class Payload:
    """Unpickling this would create a file: a stand-in for code a checkpoint could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("where", ["models", "auxiliary"])
def test_a_checkpoint_that_would_run_code_is_refused_unrun(released, tracker_module, tmp_path, where):
    path, _, _ = released["bedroom"]
    checkpoint = torch.load(path, weights_only=False)
    marker = tmp_path / "ran"
    checkpoint[where]["payload"] = Payload(str(marker))
    torch.save(checkpoint, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"^ALAE checkpoint '.*evil.pth' was refused: it holds pickled objects "
                                              r"other than tensors and plain containers") as e:
        build(config("bedroom", tmp_path / "evil.pth"))
    assert "\n" not in str(e.value) and not marker.exists()


def test_only_the_loss_trackers_classes_are_read_as_inert_records(released, tracker_module, tmp_path, monkeypatch):
    """Another class of the training code (here one named like the tracker's) is still refused."""
    path, _, _ = released["bedroom"]
    checkpoint = torch.load(path, weights_only=False)

    class LossTracker:
        pass

    LossTracker.__module__, LossTracker.__qualname__ = "tracker", "LossTracker"
    monkeypatch.setattr(tracker_module, "LossTracker", LossTracker, raising=False)
    checkpoint["auxiliary"]["tracker"] = LossTracker()
    torch.save(checkpoint, tmp_path / "tracker.pth")
    with pytest.raises(CheckpointError, match="tracker.pth' was refused"):
        build(config("bedroom", tmp_path / "tracker.pth"))
    # The released layout itself loads, and leaves nothing allowlisted behind.
    build(config("bedroom", path))
    with pytest.raises(Exception, match="RunningMeanTorch"):
        torch.load(path, weights_only=True)


# ---------------------------------------------------------------- end to end


def write_two_layouts(root, counts, size):
    """Scenes whose layout goes with their colours: a warm scene has its square (class 1) top left and its bar
    (class 2) on the right, a cool one the square bottom right and the bar on the left. ALAE's features reach
    the pixels only through the image's latent, so they can tell the layouts apart only if that latent (the
    encoder's) reaches the generator."""
    rng = np.random.default_rng(0)
    for split, n in counts.items():
        folder = root / split
        folder.mkdir(parents=True)
        for i in range(n):
            warm = i % 2 == 0
            image = np.empty((size, size, 3), np.uint8)
            image[:] = (150, 110, 70) if warm else (60, 100, 150)
            image += rng.integers(0, 20, image.shape, dtype=np.uint8)
            label = np.zeros((size, size), np.uint8)
            side, bar = 3 * size // 8, size // 8
            y, x = (4, 4) if warm else (size - side - 4,) * 2
            col = size - 2 * bar if warm else bar
            image[y:y + side, x:x + side] = (240, 230, 200) if warm else (200, 230, 240)
            label[y:y + side, x:x + side] = 1
            image[:, col:col + bar] = 20
            label[:, col:col + bar] = 2
            label[0, 0] = 255
            Image.fromarray(image).save(folder / f"{i:03d}.png")
            np.save(folder / f"{i:03d}.npy", label)
    return root


@pytest.mark.parametrize("name", ["bedroom", "ffhq"])
def test_train_interpreter_end_to_end(released, tmp_path, name):
    path, _, _ = released[name]
    data = write_two_layouts(tmp_path / "data", {"train": 2, "test": 4}, SIZE)
    cfg = config(name, path, exp_dir=str(tmp_path / "runs"), training_path=str(data / "train"),
                 testing_path=str(data / "test"), testing_number=4)
    folder, metrics = train_interpreter(cfg, tmp_path / "alae.json")
    assert folder == tmp_path / "runs" / "seed_0"
    assert metrics["model_type"] == "alae"
    # Features that ignore the image's latent are the same for both layouts: with the encoder's output replaced
    # by one fixed latent these runs score 0.43-0.45. With the encoded latent they score 0.87 (ffhq) and 0.98.
    assert metrics["miou"] > 0.75
    assert np.load(folder / "predictions" / "000.npy").shape == (SIZE, SIZE)
    assert os.path.isfile(folder / "model_1.pth")
