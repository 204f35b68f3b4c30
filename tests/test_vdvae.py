"""VDVAE backbone: the released FFHQ-256 file's keys and shapes, feature layout and order, the features against a
step-by-step computation from the raw state_dict, checkpoint refusals, config checks and train-interpreter end to
end.

Models that compute are small (the FFHQ-256 block-string structure at every resolution level, one or two blocks
per level, width 16); the paper-size model is only built on the meta device.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm_seg.backbones import create_feature_extractor, image_noise, vdvae
from ddpm_seg.backbones.vdvae import VDVAE, VDVAEFeatureExtractor
from ddpm_seg.config import load_experiment, validate_experiment
from guided_diffusion.checkpoint import CheckpointError, load_state_dict_strict
from scenes import write_splits
from interpreter_runs import train_interpreter

REPO = Path(__file__).resolve().parent.parent
LISTING = REPO / "tests" / "fixtures" / "keys" / "vdvae_ffhq256.txt"
PAPER_RESOLUTIONS = [1, 4, 8, 16, 32, 64, 128, 256]
SIZE = 32
TINY = dict(width=16, zdim=4, bottleneck_multiple=0.25, no_bias_above=16, num_mixtures=2,
            enc_blocks="32x1,32d2,16x1,16d2,8x1,8d2,4x1,4d4,1x1",
            dec_blocks="1x1,4m1,4x1,8m4,8x1,16m8,16x1,32m16")
# TINY's block strings spelled out for the step-by-step computation: (resolution, down rate) per encoder block,
# (resolution, mixin resolution) per decoder block.
TINY_ENCODER = [(32, None), (32, 2), (16, None), (16, 2), (8, None), (8, 2), (4, None), (4, 4), (1, None)]
TINY_DECODER = [(1, None), (4, 1), (4, None), (8, 4), (8, None), (16, 8), (16, None), (32, 16)]
TINY_RESOLUTIONS = [1, 4, 8, 16, 32]
TINY_FEATURES = 2 * len(TINY_RESOLUTIONS) * TINY["width"]


def read_listing(path):
    with open(path) as f:
        return [tuple(line.rstrip("\n").split("\t")) for line in f if not line.startswith("#")]


def listing(state_dict):
    return [(k, ",".join(str(s) for s in v.shape)) for k, v in state_dict.items()]


def random_images(n=None, size=SIZE, seed=0):
    shape = (size, size, 3) if n is None else (n, size, size, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def config(model_path, **overrides):
    return {"exp_dir": "unused", "model_type": "vdvae", "number_class": 3, "ignore_label": 255,
            "training_path": "unused", "testing_path": "unused", "model_path": str(model_path),
            "dim": [SIZE, SIZE, TINY_FEATURES], "steps": [], "blocks": TINY_RESOLUTIONS, "model_num": 2,
            "batch_size": 64, "training_number": 2, "testing_number": 2, "upsample_mode": "bilinear",
            "share_noise": True, "input_activations": False, **overrides}


def build(cfg, seed=0, random_init=False, dtype="fp32"):
    return create_feature_extractor(validate_experiment(cfg), {}, torch.device("cpu"), seed=seed,
                                    random_init=random_init, dtype=dtype)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(vdvae, "ARCHITECTURE", TINY)


@pytest.fixture
def released(tmp_path, tiny):
    """A small VDVAE saved as the released files are (a plain state_dict), its weights all perturbed so that
    every parameter, the zero-initialised ones too, changes the features: (path, state_dict)."""
    torch.manual_seed(0)
    model = VDVAE(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    path = tmp_path / "ffhq256-model-ema.th"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


# ---------------------------------------------------------------- architecture vs the released file


def test_paper_size_keys_and_shapes_match_the_listing_line_by_line():
    with torch.device("meta"):
        model = VDVAE(vdvae.ARCHITECTURE)
    assert listing(model.state_dict()) == read_listing(LISTING)
    assert sum(p.numel() for p in model.parameters()) == 114874852  # the listing's header
    # A state_dict with exactly the listing's keys and shapes loads strictly.
    with torch.device("meta"):
        from_listing = {k: torch.empty(*map(int, shape.split(","))) for k, shape in read_listing(LISTING)}
    load_state_dict_strict(model, from_listing, "listing", hints=None)


def test_paper_feature_layout_on_the_meta_device():
    with torch.device("meta"):
        model = VDVAE(vdvae.ARCHITECTURE)
    extractor = VDVAEFeatureExtractor(model, PAPER_RESOLUTIONS, ["encoder", "decoder"], "posterior_mean", 0)
    maps = extractor(random_images(size=256))
    assert [tuple(m.shape) for m in maps] == [(512, r, r) for r in PAPER_RESOLUTIONS] * 2
    paper = load_experiment(str(REPO / "experiments" / "ffhq_34" / "vdvae.json"))
    assert sum(m.shape[0] for m in maps) == paper.dim[-1] == 8192


def test_block_strings_parse_to_the_ffhq256_depths():
    encoder = vdvae.parse_blocks(vdvae.ARCHITECTURE["enc_blocks"])
    decoder = vdvae.parse_blocks(vdvae.ARCHITECTURE["dec_blocks"])
    assert (len(encoder), len(decoder)) == (68, 66)
    assert encoder[:5] == [(256, None)] * 3 + [(256, 2), (128, None)] and encoder[-5:] == [(4, 4)] + [(1, None)] * 4
    assert decoder[:4] == [(1, None), (1, None), (4, 1), (4, None)] and decoder[-1] == (256, 128)
    assert vdvae.resolutions(vdvae.ARCHITECTURE) == PAPER_RESOLUTIONS


# ---------------------------------------------------------------- features, computed step by step


def block(sd, prefix, x, residual=False, down=None):
    """VDVAE's Block from the raw state_dict: GELU then conv, four times; kernel sizes read off the weights."""
    h = x
    for conv in ("c1", "c2", "c3", "c4"):
        weight = sd[f"{prefix}.{conv}.weight"]
        h = F.conv2d(F.gelu(h), weight, sd[f"{prefix}.{conv}.bias"], padding=weight.shape[-1] // 2)
    out = x + h if residual else h
    return F.avg_pool2d(out, down) if down else out


def step_by_step(sd, images, latent):
    """({resolution: encoder activation}, {resolution: decoder stream}) of uint8 images [N, H, W, 3];
    latent(block index, posterior mean, posterior log sigma) -> z."""
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2)
    x = (x - 112.8666757481) / 69.84780273
    x = F.conv2d(x, sd["encoder.in_conv.weight"], sd["encoder.in_conv.bias"], padding=1)
    encoded = {SIZE: x}
    for i, (res, down) in enumerate(TINY_ENCODER):
        x = block(sd, f"encoder.enc_blocks.{i}", x, residual=True, down=down)
        encoded[res // (down or 1)] = x
    biases = [sd[f"decoder.bias_xs.{j}"] for j in range(4)]  # resolutions 1, 4, 8, 16 (no_bias_above 16)
    stream = {b.shape[-1]: b.expand(len(images), -1, -1, -1) for b in biases}
    zdim = TINY["zdim"]
    for i, (res, mixin) in enumerate(TINY_DECODER):
        prefix = f"decoder.dec_blocks.{i}"
        x = stream.get(res, torch.zeros_like(encoded[res]))
        if mixin:
            x = x + stream[mixin].repeat_interleave(res // mixin, 2).repeat_interleave(res // mixin, 3)
        posterior = block(sd, f"{prefix}.enc", torch.cat([x, encoded[res]], 1))
        x = x + block(sd, f"{prefix}.prior", x)[:, 2 * zdim:]
        z = latent(i, posterior[:, :zdim], posterior[:, zdim:])
        x = x + F.conv2d(z, sd[f"{prefix}.z_proj.weight"], sd[f"{prefix}.z_proj.bias"])
        stream[res] = block(sd, f"{prefix}.resnet", x, residual=True)
    stream[SIZE] = stream[SIZE] * sd["decoder.gain"] + sd["decoder.bias"]
    return encoded, stream


def expected_maps(sd, images, streams, latent):
    encoded, decoded = step_by_step(sd, images, latent)
    taken = {"encoder": encoded, "decoder": decoded}
    return [taken[s][r] for s in streams for r in TINY_RESOLUTIONS]


@pytest.mark.parametrize("streams", [["encoder", "decoder"], ["decoder"], ["decoder", "encoder"]])
def test_features_are_the_encoder_then_decoder_activations_from_the_posterior_means(released, streams):
    path, sd = released
    images = random_images(2)
    maps = build(config(path, streams=streams, dim=[SIZE, SIZE, 16 * 5 * len(streams)]))(images)
    with torch.no_grad():
        expected = expected_maps(sd, images, streams, lambda i, mean, log_sigma: mean)
    assert [tuple(m.shape) for m in maps] == [(2, 16, r, r) for r in TINY_RESOLUTIONS] * len(streams)
    for ours, theirs in zip(maps, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_posterior_samples_are_seeded_by_the_image_and_view(released):
    path, sd = released
    images = random_images(2)
    extractor = build(config(path, latents="posterior_sample"), seed=7)
    maps = extractor(images)

    def sample(i, mean, log_sigma):
        return mean + torch.exp(log_sigma) * image_noise(7, images, 0, i, mean.shape[1:], "cpu")

    with torch.no_grad():
        expected = expected_maps(sd, images, ["encoder", "decoder"], sample)
    for ours, theirs in zip(maps, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # An image's features do not depend on its batch; another view draws other latents; the mean differs.
    single = extractor(images[1])
    assert all(torch.allclose(a, b[1], rtol=1e-4, atol=1e-5) for a, b in zip(single, maps))
    assert not torch.allclose(extractor(images[1], view=1)[-1], single[-1])
    assert not torch.allclose(build(config(path))(images[1])[-1], single[-1])
    # The encoder does not sample: its maps are the same either way.
    torch.testing.assert_close(build(config(path))(images[1])[0], single[0])


def test_single_images_give_the_batch_maps_and_bf16_runs_close(released):
    path, _ = released
    images = random_images(2)
    extractor = build(config(path))
    batch = extractor(images)
    single = extractor(images[0])
    assert all(m.dtype == torch.float32 for m in single)
    for a, b in zip(single, batch):
        torch.testing.assert_close(a, b[0], rtol=1e-4, atol=1e-5)
    low = build(config(path), dtype="bf16")(images[0])
    assert all(m.dtype == torch.float32 for m in low)
    for a, b in zip(low, single):
        assert (a - b).norm() / b.norm() < 0.05


def test_an_image_of_another_size_is_refused(released):
    path, _ = released
    with pytest.raises(ValueError, match=r"VDVAE reads 32x32 images, got \(64, 64\)"):
        build(config(path))(random_images(size=64))


# ---------------------------------------------------------------- checkpoints


def test_released_file_loads_strictly_and_its_weights_are_used(released, tmp_path):
    path, sd = released
    extractor = build(config(path))
    loaded = extractor.vae.state_dict()
    assert list(loaded) == list(sd) and all(torch.equal(loaded[k], v) for k, v in sd.items())
    assert not extractor.vae.training
    # The non-EMA file of a distributed run: 'module.' prefixes, stripped as the original loader does.
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.th")
    assert torch.equal(build(config(tmp_path / "ddp.th")).vae.state_dict()["decoder.gain"], sd["decoder.gain"])
    image = random_images()
    assert not torch.equal(extractor(image)[-1], build(config(path), seed=1, random_init=True)(image)[-1])


def test_wrong_keys_are_named(released, tmp_path):
    path, sd = released
    bad = dict(sd, **{"decoder.extra": torch.zeros(1)})
    del bad["decoder.dec_blocks.3.prior.c4.bias"]
    torch.save(bad, tmp_path / "bad.th")
    with pytest.raises(CheckpointError, match=r"(?s)bad.th'.*missing keys \(1\):\n    decoder.dec_blocks.3.prior.c4.bias"
                                              r".*unexpected keys \(1\):\n    decoder.extra"):
        build(config(tmp_path / "bad.th"))


def test_a_model_of_other_widths_is_refused_with_the_shapes(released, tmp_path, monkeypatch):
    path, _ = released
    monkeypatch.setattr(vdvae, "ARCHITECTURE", dict(TINY, zdim=8))
    with pytest.raises(CheckpointError, match=r"shape mismatches.*\n    decoder.dec_blocks.0.enc.c4.weight: "
                                              r"checkpoint \(8, 4, 1, 1\) vs model \(16, 4, 1, 1\)"):
        build(config(path))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_truncated_foreign_wrapped_and_code_carrying_files_are_refused(released, tmp_path, monkeypatch):
    path, sd = released
    monkeypatch.chdir(tmp_path)
    truncated = tmp_path / "truncated.th"
    truncated.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    foreign = tmp_path / "image.th"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    wrapped = tmp_path / "wrapped.th"
    torch.save({"model": sd, "step": 3}, wrapped)
    code = tmp_path / "code.th"
    torch.save(dict(sd, extra=_RunsCode()), code)
    for file, message in ((truncated, "is not a readable PyTorch checkpoint"),
                          (foreign, "is not a PyTorch checkpoint"),
                          (wrapped, "is not usable: expected a state_dict of tensors"),
                          (code, "was refused: .* could execute code")):
        with pytest.raises(CheckpointError, match=rf"VDVAE checkpoint '.*{file.name}' {message}") as error:
            build(config(file))
        assert "\n" not in str(error.value)
    assert not os.path.exists("PWNED")
    with pytest.raises(FileNotFoundError, match="missing.th' does not exist"):
        build(config(tmp_path / "missing.th"))


def test_random_init_is_seeded_and_needs_no_checkpoint(tiny, tmp_path):
    cfg = config(tmp_path / "nonexistent.th")
    first, again, other = (build(cfg, seed, random_init=True).vae.state_dict() for seed in (3, 3, 4))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("change, message", [
    ({"blocks": [2, 4]}, r"'blocks' are decoder resolutions, one or more of \[1, 4, 8, 16, 32\]; got \[2, 4\]"),
    ({"blocks": []}, r"'blocks' are decoder resolutions.*got \[\]"),
    ({"dim": [64, 64, 160]}, r"reads 32x32 images: dim \[64, 64\] must be \[32, 32, \.\.\.\]"),
    ({"streams": ["decoder", "prior"]}, r"'streams' lists each of \['encoder', 'decoder'\].*got \['decoder', 'prior'\]"),
    ({"streams": ["decoder", "decoder"]}, r"'streams' lists each of"),
    ({"latents": "prior_mean"}, r"'latents' must be one of \['posterior_mean', 'posterior_sample'\], got 'prior_mean'"),
])
def test_unusable_settings_are_refused_naming_the_file(tiny, change, message):
    with pytest.raises(ValueError, match=r"^exp.json: VDVAE " + message):
        validate_experiment(config("x.th", **change), "exp.json")


def test_input_activations_is_refused(tiny):
    with pytest.raises(ValueError, match="input_activations does not apply to model_type 'vdvae'"):
        build(config("x.th", input_activations=True), random_init=True)


@pytest.mark.parametrize("dataset", ["ffhq_34", "celeba_19"])
def test_paper_configs_follow_the_ddpm_config(dataset):
    ddpm = load_experiment(str(REPO / "experiments" / dataset / "ddpm.json"))
    cfg = load_experiment(str(REPO / "experiments" / dataset / "vdvae.json"))
    assert cfg.to_dict() == dict(ddpm.to_dict(), model_type="vdvae", exp_dir=f"pixel_classifiers/{dataset}/vdvae",
                                 model_path="checkpoints/vdvae/ffhq256.th", dim=[256, 256, 8192], steps=[],
                                 blocks=PAPER_RESOLUTIONS, input_activations=False,
                                 streams=["encoder", "decoder"], latents="posterior_mean")


# ---------------------------------------------------------------- end to end


def test_train_interpreter_end_to_end(released, tmp_path):
    path, _ = released
    data = write_splits(tmp_path / "data", {"train": 2, "test": 2}, size=SIZE, bar=SIZE // 4)
    cfg = config(path, exp_dir=str(tmp_path / "runs"), training_path=str(data / "train"),
                 testing_path=str(data / "test"))
    folder, metrics = train_interpreter(cfg, tmp_path / "vdvae.json")
    assert folder == tmp_path / "runs" / "seed_0"
    assert metrics["model_type"] == "vdvae"
    # These features score about 0.99 here (the encoder's full-resolution map keeps the pixels, which carry the
    # labels); the decoder's maps alone about 0.46; labelling everything background about 0.24.
    assert metrics["miou"] > 0.8
    assert np.load(folder / "predictions" / "000.npy").shape == (SIZE, SIZE)
