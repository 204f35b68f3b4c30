"""GAN Encoder backbone: e4e's encoder against its key listing and its definition, the e4e checkpoint format
(encoder entries, latent_avg, opts), both feature readings, refused inputs, configs, and train-interpreter end
to end.

Models that compute are small: the encoder keeps IR-SE-50's units, taps and style heads with a stem of 16
channels and 16-wide codes; the generator is a 32-pixel StyleGAN2 (8 W+ entries, so coarse, middle and fine
heads all run). The paper-size encoder is only built on the meta device.
"""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddpm_seg.backbones import create_feature_extractor, gan_encoder, stylegan2
from ddpm_seg.backbones.gan_encoder import (EncoderFeatures, Encoder4Editing, InvertedGeneratorFeatures, IRSEUnit,
                                            encoder_input)
from ddpm_seg.config import load_experiment, validate_experiment
from guided_diffusion.checkpoint import CheckpointError
from scenes import write_splits
from interpreter_runs import train_interpreter

REPO = Path(__file__).resolve().parent.parent
LISTING = REPO / "tests" / "fixtures" / "keys" / "e4e_ffhq_encoder.txt"
PAPER_CONFIGS = {"ffhq_34": "ffhq", "celeba_19": "ffhq", "horse_21": "horse"}
SIZE = 64  # image side of the end-to-end data and the small encoder's input
TINY_ENCODER = dict(width=16, w_dim=16)
TINY_GENERATOR = dict(stylegan2.CONFIG_F, img_resolution=32, z_dim=16, w_dim=16, mapping_layers=2,
                      channel_base=256, channel_max=16)
TINY_NAME = "tiny-config-f"
RESOLUTIONS = [4, 8, 16, 32]
TINY_FEATURES = 16 + 16 + 16 + 8  # min(256 / r, 16) channels per resolution
UNITS = [2, 6, 20, 23]
UNIT_FEATURES = 16 + 32 + 64 + 128  # stage depths 16, 32, 64, 128


def read_listing(path):
    with open(path) as f:
        return [tuple(line.rstrip("\n").split("\t")) for line in f if not line.startswith("#")]


def listing(state_dict):
    return [(k, ",".join(str(s) for s in v.shape)) for k, v in state_dict.items()]


def random_image(size=SIZE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def trained_like(module):
    """Batch-norm statistics, affines and PReLU slopes as a trained network has them, so a normalisation or
    activation that is skipped or misloaded shows in the numbers."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
        elif isinstance(m, torch.nn.PReLU):
            m.weight.data.uniform_(0, 0.5)
    return module.eval()


def tiny_encoder(num_styles=8, seed=0):
    torch.manual_seed(seed)
    return trained_like(Encoder4Editing(num_styles, **TINY_ENCODER))


def e4e_release(encoder, latent_avg=None, opts=None):
    """A file in e4e's format: pSp's state_dict (encoder entries, and a rosinality-format decoder copy that is
    not used), the training options as a plain dict, and the average latent repeated per W+ entry."""
    decoder = {"decoder.style.1.weight": torch.randn(16, 16), "decoder.input.input": torch.randn(1, 16, 4, 4),
               "decoder.convs.0.conv.weight": torch.randn(1, 16, 16, 3, 3)}
    ckpt = {"state_dict": {**{"encoder." + k: v for k, v in encoder.state_dict().items()}, **decoder},
            "opts": {"encoder_type": "Encoder4Editing", "stylegan_size": 32, "start_from_latent_avg": True,
                     "progressive_steps": [0, 2000], "checkpoint_path": None, "lpips_lambda": 0.8,
                     "device": "cuda:0"} if opts is None else opts}
    if latent_avg is not None:
        ckpt["latent_avg"] = latent_avg
    return ckpt


@pytest.fixture
def tiny(monkeypatch):
    """Registered builders make small models; the tiny generator has a name for --random_init."""
    monkeypatch.setattr(gan_encoder, "ARCHITECTURE", TINY_ENCODER)
    monkeypatch.setitem(stylegan2.ARCHITECTURES, TINY_NAME, TINY_GENERATOR)


@pytest.fixture
def released(tmp_path, tiny):
    """(e4e checkpoint path, generator path, encoder, latent_avg, generator) of small random models."""
    torch.manual_seed(1)
    generator = stylegan2.create_generator(TINY_GENERATOR).eval()
    generator.mapping.w_avg.normal_()
    stylegan2.save_generator(generator, tmp_path / "generator.pt")
    encoder = tiny_encoder()
    latent_avg = torch.randn(8, 16)
    torch.save(e4e_release(encoder, latent_avg), tmp_path / "e4e.pt")
    return tmp_path / "e4e.pt", tmp_path / "generator.pt", encoder, latent_avg, generator


def config(released_files=None, features="generator", size=SIZE, **overrides):
    e4e, generator = released_files[:2] if released_files else ("/nonexistent/e4e.pt", "/nonexistent/g.pt")
    cfg = {"exp_dir": "unused", "model_type": "gan_encoder", "number_class": 3, "ignore_label": 255,
           "training_path": "unused", "testing_path": "unused", "dim": [size, size, TINY_FEATURES], "steps": [],
           "model_num": 2, "batch_size": 64, "training_number": 2, "testing_number": 2,
           "upsample_mode": "bilinear", "share_noise": True, "input_activations": False, "encoder_size": SIZE}
    if features == "generator":
        cfg.update(model_path=str(generator), encoder_path=str(e4e), generator=TINY_NAME, blocks=RESOLUTIONS)
    else:
        cfg.update(model_path=str(e4e), features="encoder", blocks=UNITS, dim=[size, size, UNIT_FEATURES])
    return {**cfg, **overrides}


def build(cfg, seed=0, random_init=False):
    return create_feature_extractor(validate_experiment(cfg), {}, torch.device("cpu"), seed=seed,
                                    random_init=random_init)


def symmetric(image):
    """e4e's ToTensor + Normalize(0.5, 0.5), written independently of the backbone: [1, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(image.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


# ---------------------------------------------------------------- architecture


def test_paper_size_encoder_keys_and_shapes_match_the_listing_line_by_line():
    with torch.device("meta"):
        ffhq, horse = Encoder4Editing(18), Encoder4Editing(14)
    reference = read_listing(LISTING)
    assert listing(ffhq.state_dict()) == reference
    assert sum(p.numel() for p in ffhq.parameters()) == 267136704  # the listing's header
    # A 256-pixel generator's encoder (horse, church) has the first 14 style heads only.
    ffhq_only = tuple(f"styles.{i}." for i in range(14, 18))
    assert listing(horse.state_dict()) == [(k, s) for k, s in reference if not k.startswith(ffhq_only)]


def test_paper_size_feature_layouts_on_the_meta_device():
    with torch.device("meta"):
        encoder = Encoder4Editing(18)
        generator = stylegan2.create_generator("stylegan2-ffhq-config-f")
    image = np.zeros((256, 256, 3), np.uint8)
    maps = InvertedGeneratorFeatures(encoder, None, generator, [4, 8, 16, 32, 64, 128, 256], 256)(image)
    assert [tuple(m.shape) for m in maps] == [(512, r, r) for r in (4, 8, 16, 32, 64)] + [(256, 128, 128),
                                                                                          (128, 256, 256)]
    maps = EncoderFeatures(encoder, [2, 6, 20, 23], 256)(image)
    assert [tuple(m.shape) for m in maps] == [(64, 128, 128), (128, 64, 64), (256, 32, 32), (512, 16, 16)]


@pytest.mark.parametrize("in_channels, depth, stride", [(16, 32, 2), (32, 32, 1), (32, 32, 2)])
def test_ir_se_unit_equals_its_definition(in_channels, depth, stride):
    """bottleneck_IR_SE computed with functional ops: BN, 3x3 conv, PReLU, strided 3x3 conv, BN, SE gate
    (mean pool, 1x1 down to depth / 16, ReLU, 1x1 up, sigmoid); shortcut: 1x1 conv + BN, or subsampling."""
    torch.manual_seed(0)
    unit = trained_like(IRSEUnit(in_channels, depth, stride))
    bn0, conv1, prelu, conv2, bn1, se = unit.res_layer
    x = torch.randn(2, in_channels, 12, 12)

    def bn(m, t):
        return (t - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps) \
            * m.weight[:, None, None] + m.bias[:, None, None]

    with torch.no_grad():
        r = F.conv2d(bn(bn0, x), conv1.weight, padding=1)
        r = torch.where(r > 0, r, prelu.weight[:, None, None] * r)
        r = bn(bn1, F.conv2d(r, conv2.weight, stride=stride, padding=1))
        pooled = r.mean((2, 3), keepdim=True)
        gate = torch.sigmoid(F.conv2d(torch.relu(F.conv2d(pooled, se.fc1.weight)), se.fc2.weight))
        if in_channels == depth:
            shortcut = x[:, :, ::stride, ::stride]
        else:
            shortcut = bn(unit.shortcut_layer[1], F.conv2d(x, unit.shortcut_layer[0].weight, stride=stride))
        expected = r * gate + shortcut
        torch.testing.assert_close(unit(x), expected, rtol=1e-5, atol=1e-5)
    assert se.fc1.weight.shape == (depth // 16, depth, 1, 1)


def test_codes_are_e4e_first_code_plus_deltas_from_the_feature_pyramid():
    """ws[:, 0] from the coarse level (unit 23), ws[:, i] = ws[:, 0] + head i of its level: coarse for 1-2,
    middle (unit 23 upsampled + lateral of unit 20) for 3-6, fine (+ lateral of unit 6) from 7."""
    encoder = tiny_encoder(num_styles=10)
    x = symmetric(random_image())
    with torch.no_grad():
        h, taps = encoder.input_layer(x), {}
        for i, unit in enumerate(encoder.body):
            h = taps[i] = unit(h)
        up = lambda t, like: F.interpolate(t, size=like.shape[-2:], mode="bilinear", align_corners=True)  # noqa: E731
        coarse = taps[23]
        middle = up(coarse, taps[20]) + encoder.latlayer1(taps[20])
        fine = up(middle, taps[6]) + encoder.latlayer2(taps[6])
        levels = [coarse] * 3 + [middle] * 4 + [fine] * 3
        w0 = encoder.styles[0](coarse)
        expected = torch.stack([w0] + [w0 + encoder.styles[i](levels[i]) for i in range(1, 10)], dim=1)
        torch.testing.assert_close(encoder(x), expected, rtol=1e-5, atol=1e-6)
    assert tuple(coarse.shape[-2:]) == (4, 4) and tuple(fine.shape[-2:]) == (16, 16)


def test_encoder_input_is_e4e_test_transform():
    """Resize((256, 256)) on the PIL image, ToTensor, Normalize(0.5, 0.5): PIL rounds to uint8 after resizing,
    so the two agree to about one grey level."""
    image = random_image(size=96, seed=3)
    ours = encoder_input(image, 64, "cpu", torch.float32)
    pil = np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR))
    torch.testing.assert_close(ours, symmetric(pil), rtol=0, atol=2.5 / 127.5)
    torch.testing.assert_close(encoder_input(image[:64, :64], 64, "cpu", torch.float32), symmetric(image[:64, :64]))


# ---------------------------------------------------------------- features


def test_generator_features_are_the_synthesis_maps_of_the_encoded_codes_plus_latent_avg(released):
    e4e, _, encoder, latent_avg, generator = released
    extractor = build(config(released))
    image = random_image()
    with torch.no_grad():
        ws = encoder(symmetric(image)) + latent_avg
        _, expected = generator.synthesis(ws, read=RESOLUTIONS)
    maps = extractor(image)
    assert [tuple(m.shape) for m in maps] == [(16, 4, 4), (16, 8, 8), (16, 16, 16), (8, 32, 32)]
    for ours, theirs in zip(maps, expected):
        torch.testing.assert_close(ours, theirs[0], rtol=1e-5, atol=1e-5)
    batch = extractor(np.stack([image, random_image(seed=1)]))
    torch.testing.assert_close(batch[2][0], maps[2], rtol=1e-4, atol=1e-5)
    # Without latent_avg the codes, and so the maps, differ: the offset is really added.
    without = InvertedGeneratorFeatures(extractor.encoder, None, extractor.generator, RESOLUTIONS, SIZE)(image)
    assert not torch.allclose(without[0], maps[0])


@pytest.mark.parametrize("features", ["generator", "encoder"])
def test_bf16_features_follow_float32_and_come_back_as_float32(released, features):
    image = random_image()
    cfg = validate_experiment(config(released, features=features))
    full, half = (create_feature_extractor(cfg, {}, torch.device("cpu"), dtype=d)(image) for d in ("fp32", "bf16"))
    for a, b in zip(full, half):
        assert b.dtype == torch.float32
        assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_encoder_features_are_the_body_unit_outputs(released):
    e4e, _, encoder, _, _ = released
    extractor = build(config(released, features="encoder"))
    image = random_image()
    with torch.no_grad():
        h, expected = encoder.input_layer(symmetric(image)), []
        for i, unit in enumerate(encoder.body[:24]):
            h = unit(h)
            if i in UNITS:
                expected.append(h[0])
    maps = extractor(image)
    assert [tuple(m.shape) for m in maps] == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (128, 4, 4)]
    for ours, theirs in zip(maps, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opts, stored, added", [
    ({"start_from_latent_avg": False}, True, False),  # pSp adds latent_avg only with this option
    (None, True, True),  # no options: added whenever present, as load_e4e_standalone does
    ({"start_from_latent_avg": True}, "row", True),  # one [1, w_dim] row, broadcast as pSp's repeat does
])
def test_latent_avg_is_added_where_e4e_adds_it(tmp_path, tiny, opts, stored, added):
    encoder = tiny_encoder()
    latent_avg = torch.randn(1, 16) if stored == "row" else torch.randn(8, 16)
    ckpt = e4e_release(encoder, latent_avg, opts)
    if opts is None:
        del ckpt["opts"]
    torch.save(ckpt, tmp_path / "e4e.pt")
    loaded, offset = gan_encoder.load_encoder(str(tmp_path / "e4e.pt"), 8, TINY_ENCODER)
    assert (offset is not None) == added
    if added:
        assert torch.equal(offset, latent_avg.expand(8, 16))


def test_checkpoint_loads_strictly_and_its_weights_are_used(released):
    e4e, _, encoder, _, generator = released
    extractor = build(config(released))
    loaded = extractor.encoder.state_dict()
    assert list(loaded) == list(encoder.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in encoder.state_dict().items())
    assert not extractor.encoder.training and not extractor.generator.training
    random = build(config(released), seed=1, random_init=True)
    image = random_image()
    assert not torch.equal(extractor(image)[-1], random(image)[-1])


# ---------------------------------------------------------------- refused inputs


def rewrite(path, tmp_path, change):
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


@pytest.mark.parametrize("change, message", [
    (lambda c: c["state_dict"].pop("encoder.body.23.res_layer.4.running_var"),
     r"bad.pt' does not match.*\n  missing keys \(1\):\n    body.23.res_layer.4.running_var$"),
    (lambda c: c["state_dict"].update({"encoder.output_layer.weight": torch.zeros(2)}),
     r"bad.pt' does not match.*\n  unexpected keys \(1\):\n    output_layer.weight$"),
    (lambda c: c["state_dict"].update({"latent_avg": torch.zeros(2)}),
     r"bad.pt' is not usable: its state_dict must hold 'encoder.' \(and 'decoder.'\) entries, found \['latent_avg'\]"),
    (lambda c: c.update(latent_avg=torch.zeros(3, 16)),
     r"bad.pt': 'latent_avg' has shape \(3, 16\), expected \(8, 16\)"),
    (lambda c: c.pop("latent_avg"),
     r"bad.pt' was trained with start_from_latent_avg but holds no 'latent_avg' tensor"),
    (lambda c: c.update(state_dict={k: v for k, v in c["state_dict"].items() if not k.startswith("encoder.styles.7.")}),
     r"bad.pt' predicts 7 W\+ entries, the generator takes 8: pair the encoder with the generator"),
])
def test_bad_e4e_checkpoints_are_refused_naming_the_file_and_key(released, tmp_path, change, message):
    bad = rewrite(released[0], tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        build(config((bad, released[1])))


class RunsCode:
    """Unpickling it calls os.mkdir(marker): the marker folder shows whether a loader ran the file's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_foreign_truncated_and_code_carrying_files_are_refused_in_one_line(released, tmp_path):
    e4e, generator_path, encoder, _, _ = released
    torch.save(encoder.state_dict(), tmp_path / "flat.pt")  # a bare state_dict, not e4e's format
    data = e4e.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    marker = tmp_path / "code_ran"
    torch.save({"state_dict": {}, "opts": RunsCode(marker)}, tmp_path / "code.pt")
    with open(tmp_path / "code.pkl", "wb") as f:  # a plain pickle, with the protocol of torch.save's legacy format
        pickle.dump({"state_dict": RunsCode(marker)}, f, protocol=2)
    cases = {"flat.pt": r"is not usable: expected \{'state_dict': pSp state_dict",
             "truncated.pt": "is not a readable PyTorch checkpoint",
             "code.pt": "could execute code", "code.pkl": "could execute code"}
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=rf"'{tmp_path / name}'.*{message}") as error:
            build(config((tmp_path / name, generator_path)))
        assert "\n" not in str(error.value)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="missing.pt' does not exist"):
        build(config((tmp_path / "missing.pt", generator_path)))


@pytest.mark.parametrize("overrides, message", [
    ({"features": "decoder"}, r"'features' must be one of \['generator', 'encoder'\], got 'decoder'"),
    ({"encoder_size": 512}, r"'encoder_size' must be a multiple of 16 in 16..256 .* got 512"),
    ({"encoder_size": 100}, r"'encoder_size' must be a multiple of 16"),
    ({"blocks": [4, 12]}, r"'blocks' are generator resolutions \(powers of two from 4\), got \[12\]"),
    ({"blocks": []}, r"'blocks' must list the generator resolutions"),
    ({"steps": [50]}, r"'steps' must be \[\] for gan_encoder"),
    ({"input_activations": True}, r"'input_activations' must be false for gan_encoder"),
    ({"encoder_path": 3}, r"'encoder_path' must be of type str"),
])
def test_unusable_config_values_are_refused(tiny, overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_experiment({**config(), **overrides})


def test_each_reading_wants_its_checkpoint_keys(tiny):
    cfg = config()
    del cfg["encoder_path"]
    with pytest.raises(ValueError, match="features 'generator' needs 'encoder_path', the e4e checkpoint"):
        validate_experiment(cfg)
    with pytest.raises(ValueError, match="features 'encoder' runs the e4e encoder alone: give its checkpoint as "
                                         r"model_path and drop \['encoder_path', 'generator'\]"):
        validate_experiment(dict(config(features="encoder"), encoder_path="e4e.pt", generator=TINY_NAME))
    with pytest.raises(ValueError, match=r"'blocks' are encoder body units 0..23, got \[24\]"):
        validate_experiment(config(features="encoder", blocks=[6, 24]))


def test_resolutions_beyond_the_generator_are_refused(released):
    with pytest.raises(ValueError, match=r"blocks \[64\] exceed the generator's resolution 32"):
        build(config(released, blocks=[4, 64]))


def test_random_init_is_seeded_and_needs_no_checkpoint(tiny):
    cfg = config()
    image = random_image()
    first, again, other = (build(cfg, seed, random_init=True)(image)[1] for seed in (3, 3, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    encoders = [build(config(features="encoder"), seed, random_init=True).encoder.state_dict() for seed in (3, 4)]
    assert not torch.equal(encoders[0]["body.0.res_layer.1.weight"], encoders[1]["body.0.res_layer.1.weight"])
    with pytest.raises(ValueError, match=r"--random_init needs 'generator', the name of a StyleGAN2 architecture"):
        build({k: v for k, v in cfg.items() if k != "generator"}, random_init=True)


def test_a_generator_of_another_architecture_than_named_is_refused(released):
    with pytest.raises(CheckpointError, match=r"generator.pt' is 32x32, not a stylegan2-horse-config-f generator"):
        build(config(released, generator="stylegan2-horse-config-f"))
    with pytest.raises(ValueError, match=r"'generator' must name a StyleGAN2 architecture .* got 'horse'"):
        validate_experiment(config(released, generator="horse"))


# ---------------------------------------------------------------- configs and end to end


@pytest.mark.parametrize("dataset, domain", PAPER_CONFIGS.items())
def test_paper_configs_follow_the_ddpm_config(dataset, domain):
    ddpm = load_experiment(str(REPO / "experiments" / dataset / "ddpm.json"))
    cfg = load_experiment(str(REPO / "experiments" / dataset / "gan_encoder.json"))
    generator = stylegan2.ARCHITECTURES[f"stylegan2-{domain}-config-f"]
    channels = {r: min(generator["channel_base"] // r, generator["channel_max"]) for r in cfg.blocks}
    assert cfg.blocks == [4, 8, 16, 32, 64, 128, 256]
    assert cfg.to_dict() == dict(ddpm.to_dict(), model_type="gan_encoder",
                                 exp_dir=f"pixel_classifiers/{dataset}/gan_encoder",
                                 model_path=f"checkpoints/stylegan2/stylegan2-{domain}-config-f.pkl",
                                 encoder_path=f"checkpoints/gan_encoder/e4e_{domain}_encode.pt",
                                 generator=f"stylegan2-{domain}-config-f",
                                 dim=[256, 256, sum(channels.values())], steps=[], blocks=cfg.blocks,
                                 input_activations=False)


@pytest.fixture
def data(tmp_path):
    return write_splits(tmp_path / "data", {"train": 2, "test": 2}, size=SIZE, bar=SIZE // 4)


@pytest.mark.parametrize("features", ["encoder", "generator"])
def test_train_interpreter_end_to_end(released, data, tmp_path, features):
    cfg = config(released, features=features, exp_dir=str(tmp_path / "runs"), training_path=str(data / "train"),
                 testing_path=str(data / "test"))
    folder, metrics = train_interpreter(cfg, tmp_path / "gan_encoder.json")
    assert folder == tmp_path / "runs" / "seed_0"
    assert metrics["model_type"] == "gan_encoder"
    assert np.load(folder / "predictions" / "000.npy").shape == (SIZE, SIZE)
    if features == "encoder":
        # The encoder's maps see the image: a broken path scores like labelling everything background (about
        # 0.24); see test_backbones for how chaotic two training images make the score.
        assert metrics["miou"] > 0.35
    # The generator reading sees the image only through its W+ codes: with random weights the codes invert
    # nothing, and the maps carry no layout to segment; the numbers are checked in the tests above.
