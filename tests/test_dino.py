"""DINOv2 and DINOv3 backbones: Meta's DINOv2 release layout and timm's safetensors, the paper-size ViT-L/14
against the release key listing, position-embedding resampling as Meta's model does it, features against
timm's own forward, config refusals, bad files, and train-interpreter end to end.

Models that compute are small (ViT-L's 24 blocks, 32 channels); the paper-size models are only built on the
meta device.
"""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn

from ddpm_seg.backbones import create_feature_extractor, dino
from ddpm_seg.config import load_experiment, validate_experiment
from guided_diffusion.checkpoint import CheckpointError
from scenes import write_splits
from interpreter_runs import train_interpreter
from test_backbones import random_image, read_listing

REPO = Path(__file__).resolve().parent.parent
LISTING = REPO / "tests" / "fixtures" / "keys" / "dinov2_vitl14.txt"
DATASETS = ["bedroom_28", "ffhq_34", "cat_15", "horse_21", "celeba_19", "ade_bedroom_30"]
VITL14, VITL14_REG4, VITL16 = "vit_large_patch14_dinov2", "vit_large_patch14_reg4_dinov2", "vit_large_patch16_dinov3"
TINY_WIDTH = dict(embed_dim=32, num_heads=2)  # ViT-L's depth, narrow: 4 blocks read give 128 features
SIZE = 64  # image side of the small models and the end-to-end data
INPUT = {"dinov2": 112, "dinov3": 128}  # the default input side at SIZE: an 8x8 patch grid
PRETRAINED_GRID = 7  # the small release files' position-embedding grid (Meta's: 37)
LAST_FOUR = [20, 21, 22, 23]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def shapes(state_dict):
    return {k: ",".join(str(s) for s in v.shape) for k, v in state_dict.items()}


def resized_input(image, side):
    """ImageNet normalisation, then a bicubic resize to side x side, written independently of the backbone."""
    x = torch.from_numpy((image.astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD).permute(2, 0, 1)[None]
    return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=True)


def meta_interpolation(pos_embed, grid):
    """Meta's DinoVisionTransformer.interpolate_pos_encoding (hub defaults: offset 0.1, no antialiasing)."""
    cls_pos, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = int(patches.shape[1] ** 0.5)
    if side == grid:
        return pos_embed  # Meta's model uses its embeddings as they are at their own grid
    patches = F.interpolate(patches.reshape(1, side, side, -1).permute(0, 3, 1, 2), mode="bicubic",
                            antialias=False, scale_factor=((grid + 0.1) / side, (grid + 0.1) / side))
    return torch.cat([cls_pos, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


@pytest.fixture
def tiny(monkeypatch):
    """The registered builders build narrow models with ViT-L's depth."""
    for model_type, archs in dino.ARCHITECTURES.items():
        for arch, spec in archs.items():
            monkeypatch.setitem(archs, arch, dict(spec, **TINY_WIDTH))


def tiny_vit(arch, side, seed=0):
    """A small timm model, its layer scales and norms away from their initial values so misloading shows."""
    torch.manual_seed(seed)
    model_type = "dinov3" if "dinov3" in arch else "dinov2"
    model = dino.create_vit(arch, dict(dino.ARCHITECTURES[model_type][arch], **TINY_WIDTH), (side, side)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name or "norm" in name or "token" in name:
                p.normal_(0.5, 0.3)
    return model


def meta_release(model):
    """A file in Meta's DINOv2 release layout of a timm model at its pretraining grid: mask_token, and with
    registers, the class position kept in pos_embed and out of the class token."""
    state_dict = dict(model.state_dict(), mask_token=torch.randn(1, model.embed_dim))
    if "reg_token" in state_dict:
        cls_pos = torch.randn(1, 1, model.embed_dim)
        state_dict["register_tokens"] = state_dict.pop("reg_token")
        state_dict["pos_embed"] = torch.cat([cls_pos, state_dict["pos_embed"]], dim=1)
        state_dict["cls_token"] = state_dict["cls_token"] - cls_pos
    return state_dict


def config(model_type, model_path, **overrides):
    return {"exp_dir": "unused", "model_type": model_type, "number_class": 3, "ignore_label": 255,
            "training_path": "unused", "testing_path": "unused", "model_path": str(model_path),
            "dim": [SIZE, SIZE, 4 * TINY_WIDTH["embed_dim"]], "steps": [], "blocks": LAST_FOUR, "model_num": 2,
            "batch_size": 64, "training_number": 2, "testing_number": 2, "upsample_mode": "bilinear",
            "share_noise": True, "input_activations": False, **overrides}


def build(cfg, seed=0, random_init=False):
    return create_feature_extractor(validate_experiment(cfg), {}, torch.device("cpu"), seed=seed,
                                    random_init=random_init)


@pytest.fixture
def released(tmp_path, tiny):
    """Small random-weight files: {name: (path, config keys that fit, timm model at the pretraining grid)}."""
    files = {}
    for name, arch in (("meta", VITL14), ("meta_reg4", VITL14_REG4)):
        model = tiny_vit(arch, 14 * PRETRAINED_GRID)
        torch.save(meta_release(model), tmp_path / f"{name}.pth")
        files[name] = (tmp_path / f"{name}.pth", dict(model_type="dinov2", arch=arch), model)
    for name, arch, side in (("timm_dinov2", VITL14, 14 * PRETRAINED_GRID), ("timm_dinov3", VITL16, 128)):
        model = tiny_vit(arch, side)
        save_file(model.state_dict(), tmp_path / f"{name}.safetensors")
        model_type = "dinov3" if "dinov3" in arch else "dinov2"
        files[name] = (tmp_path / f"{name}.safetensors", dict(model_type=model_type, arch=arch), model)
    return files


# ---------------------------------------------------------------- architectures vs the released files


def test_meta_vitl14_release_keys_convert_to_exactly_the_paper_size_model():
    """Every key of Meta's dinov2_vitl14_pretrain.pth but mask_token is a parameter of timm's ViT-L/14, with
    its shape; at the configured 448 px, the 37x37 position grid becomes 32x32."""
    listed = read_listing(LISTING)
    release = {k: torch.empty([int(s) for s in shape.split(",")], device="meta") for k, shape in listed}
    assert sum(v.numel() for v in release.values()) == 304368640  # the listing's header
    spec = dino.ARCHITECTURES["dinov2"][VITL14]
    with torch.device("meta"):
        at_518, at_448 = (dino.create_vit(VITL14, spec, (s, s)) for s in (518, 448))
    converted = dino.meta_dinov2_to_timm(release)
    assert set(release) - set(converted) == {"mask_token"}
    assert shapes(converted) == shapes(at_518.state_dict())
    resampled = dino.timm_state_dict(release, at_448, "dinov2", "listing")
    assert shapes(resampled) == shapes(at_448.state_dict())
    assert resampled["pos_embed"].shape == (1, 1 + 32 * 32, 1024)


@pytest.mark.parametrize("model_type", ["dinov2", "dinov3"])
def test_architecture_table_holds_timms_own_values(model_type):
    for arch, spec in dino.ARCHITECTURES[model_type].items():
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False)
        weight = model.patch_embed.proj.weight
        assert (weight.shape[-1], weight.shape[0], len(model.blocks), model.blocks[0].attn.num_heads) == (
            spec["patch_size"], spec["embed_dim"], spec["depth"], spec["num_heads"]), arch


@pytest.mark.parametrize("arch", [VITL14, VITL14_REG4])
def test_meta_layout_conversion_agrees_with_timms_filter(arch):
    """timm's own DINOv2 checkpoint filter, at the pretraining grid, gives the same tensors."""
    model = tiny_vit(arch, 14 * PRETRAINED_GRID)
    release = meta_release(model)
    ours = dino.timm_state_dict(dict(release), model, "dinov2", "release")
    theirs = checkpoint_filter_fn(dict(release), model)
    assert list(ours) != [] and set(ours) == set(theirs) == set(model.state_dict())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ours[key], theirs[key])
        torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("old, new", [(37, 32), (7, 8), (37, 37)])
def test_position_embeddings_are_resampled_as_metas_model_does(old, new):
    pos_embed = torch.randn(1, 1 + old * old, 8)
    ours = dino.resample_pos_embed(pos_embed, 1, (new, new))
    torch.testing.assert_close(ours, meta_interpolation(pos_embed, new), rtol=0, atol=0)


# ---------------------------------------------------------------- features


@pytest.mark.parametrize("name", ["meta", "meta_reg4", "timm_dinov2", "timm_dinov3"])
def test_features_equal_timms_forward_of_the_same_weights(released, name):
    """At the pretraining grid (no resampling), the maps are timm's forward_intermediates of the original
    model on the normalised, resized image: normed outputs of the last four blocks, prefix tokens dropped."""
    path, keys, model = released[name]
    side = model.patch_embed.img_size[0]
    extractor = build(config(model_path=path, input_size=[side, side], **keys))
    image = random_image()
    maps = extractor(image)
    with torch.no_grad():
        expected = model.forward_intermediates(resized_input(image, side), indices=LAST_FOUR, norm=True,
                                               output_fmt="NCHW", intermediates_only=True)
    grid = side // model.patch_embed.patch_size[0]
    assert len(maps) == 4
    for ours, theirs in zip(maps, expected):
        assert ours.dtype == torch.float32 and ours.shape == (32, grid, grid)
        torch.testing.assert_close(ours, theirs[0], rtol=1e-4, atol=1e-4)


def test_features_at_another_input_size_use_metas_interpolated_positions(released):
    """Meta's 7x7 grid at the default 112 px input (8x8 patches): the features are timm's forward of a model at
    112 px whose position embeddings are Meta's runtime interpolation."""
    path, _, model = released["meta"]
    extractor = build(config("dinov2", path))
    at_112 = dino.create_vit(VITL14, dict(dino.ARCHITECTURES["dinov2"][VITL14]), (112, 112)).eval()
    at_112.load_state_dict(dict(model.state_dict(), pos_embed=meta_interpolation(model.pos_embed.detach(), 8)))
    image = random_image(seed=1)
    with torch.no_grad():
        expected = at_112.forward_intermediates(resized_input(image, 112), indices=LAST_FOUR, norm=True,
                                                intermediates_only=True)
    maps = extractor(image)
    assert [tuple(m.shape) for m in maps] == [(32, 8, 8)] * 4
    for ours, theirs in zip(maps, expected):
        torch.testing.assert_close(ours, theirs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("final_norm", [True, False])
def test_maps_are_the_listed_blocks_outputs_in_order(tiny, final_norm, tmp_path):
    """Forward hooks on every block of a plain pass: map i is block blocks[i]'s output patch tokens (after
    the final norm when final_norm), whatever other blocks are read."""
    extractor = build(config("dinov2", tmp_path / "none.pth", blocks=[3, 17], dim=[SIZE, SIZE, 64],
                             final_norm=final_norm), random_init=True)
    vit = extractor.vit
    outputs = []
    handles = [block.register_forward_hook(lambda mod, inp, out: outputs.append(out)) for block in vit.blocks]
    image = random_image(seed=2)
    with torch.no_grad():
        vit.forward_features(resized_input(image, INPUT["dinov2"]))
    for handle in handles:
        handle.remove()
    maps = extractor(image)
    assert len(outputs) == 24 and len(maps) == 2
    for ours, block in zip(maps, [3, 17]):
        tokens = vit.norm(outputs[block]) if final_norm else outputs[block]
        expected = tokens[0, 1:].T.reshape(32, 8, 8)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(maps[0], maps[1])


def test_a_batch_gives_each_images_maps(tiny, tmp_path):
    extractor = build(config("dinov3", tmp_path / "none.pth"), random_init=True)
    images = np.stack([random_image(seed=s) for s in (3, 4)])
    batch = extractor(images)
    assert [tuple(m.shape) for m in batch] == [(2, 32, 8, 8)] * 4
    for i, image in enumerate(images):
        for ours, single in zip(batch, extractor(image)):
            torch.testing.assert_close(ours[i], single, rtol=1e-4, atol=1e-4)


def test_paper_size_feature_layout_on_the_meta_device():
    spec = dino.ARCHITECTURES["dinov2"][VITL14]
    with torch.device("meta"):
        vit = dino.create_vit(VITL14, spec, (448, 448))
    maps = dino.DINOFeatureExtractor(vit, LAST_FOUR, (448, 448))(random_image(256))
    assert [tuple(m.shape) for m in maps] == [(1024, 32, 32)] * 4


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ["meta", "meta_reg4", "timm_dinov2", "timm_dinov3"])
def test_released_files_load_strictly(released, name):
    path, keys, model = released[name]
    extractor = build(config(model_path=path, **keys))
    loaded = extractor.vit.state_dict()
    assert set(loaded) == set(model.state_dict()) and not extractor.vit.training
    for key, value in model.state_dict().items():
        if key != "pos_embed":  # resampled to the input's grid
            # Meta's register layout folds the class position into the class token: not bit-exact.
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0 if key != "cls_token" else 1e-6)
    image = random_image()
    random = build(config(model_path=path, **keys), seed=1, random_init=True)
    assert not torch.allclose(extractor(image)[-1], random(image)[-1])


def test_unexpected_and_missing_keys_are_named(released, tmp_path):
    path, _, _ = released["meta"]
    release = torch.load(path, weights_only=True)
    release["head.weight"] = torch.zeros(3, 32)
    del release["blocks.23.ls2.gamma"]
    torch.save(release, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"(?s)bad.pth'.*missing keys \(1\):\n    blocks.23.ls2.gamma\n"
                                              r"  unexpected keys \(1\):\n    head.weight"):
        build(config("dinov2", tmp_path / "bad.pth"))


@pytest.mark.parametrize("name, model_type, match", [
    ("timm_dinov3", "dinov2", r"24-block ViT with 32 channels, 16-pixel patches and register tokens: set 'arch' \(and model_type\) "
                              r"to one of \['vit_large_patch16_dinov3 \(model_type dinov3\)'"),
    ("timm_dinov2", "dinov3", r"24-block ViT with 32 channels, 14-pixel patches and no register tokens: set 'arch' \(and model_type\) "
                              r"to one of \['vit_large_patch14_dinov2 \(model_type dinov2\)'"),
    ("meta_reg4", "dinov2", r"24-block ViT with 32 channels, 14-pixel patches and register tokens: set 'arch' "
                            r"\(and model_type\) to one of \['vit_large_patch14_reg4_dinov2 \(model_type dinov2\)'"),
])
def test_a_file_of_another_architecture_is_refused_naming_it(released, name, model_type, match):
    path, _, _ = released[name]
    with pytest.raises(CheckpointError, match=rf"(?s){path.name}'.*{match}"):
        build(config(model_type, path))


def test_metas_dinov3_layout_and_transformers_layout_are_refused(tmp_path, tiny):
    torch.save({"mask_token": torch.zeros(1, 32), "storage_tokens": torch.zeros(1, 4, 32)}, tmp_path / "meta3.pth")
    with pytest.raises(CheckpointError, match="meta3.pth' is in Meta's own DINOv3 layout"):
        build(config("dinov3", tmp_path / "meta3.pth"))
    save_file({"embeddings.cls_token": torch.zeros(1, 1, 32)}, tmp_path / "hf.safetensors")
    with pytest.raises(CheckpointError, match="hf.safetensors' cannot be loaded: this is not a DINOv2/DINOv3 ViT"):
        build(config("dinov2", tmp_path / "hf.safetensors"))


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize("name", ["meta", "timm_dinov3"])
def test_truncated_files_are_refused(released, name, tmp_path):
    path, keys, _ = released[name]
    truncated = tmp_path / f"truncated{path.suffix}"
    data = path.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    message = "not a readable safetensors file" if path.suffix == ".safetensors" else "not a readable PyTorch"
    with pytest.raises(CheckpointError, match=f"truncated{path.suffix}' is {message}"):
        build(config(model_path=truncated, **keys))


def test_code_carrying_and_foreign_files_are_refused(tiny, tmp_path, capsys):
    torch.save({"cls_token": RunsCode()}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match="code.pth' was refused: it holds pickled objects other than tensors"):
        build(config("dinov2", tmp_path / "code.pth"))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(RunsCode(), protocol=2))
    with pytest.raises(CheckpointError, match="plain.pkl'"):
        build(config("dinov2", tmp_path / "plain.pkl"))
    assert "this ran" not in capsys.readouterr().out
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(CheckpointError, match="image.png' is not a PyTorch checkpoint"):
        build(config("dinov2", tmp_path / "image.png"))
    with pytest.raises(FileNotFoundError, match="missing.pth' does not exist"):
        build(config("dinov2", tmp_path / "missing.pth"))


@pytest.mark.parametrize("model_type", ["dinov2", "dinov3"])
def test_random_init_is_seeded_and_needs_no_checkpoint(tiny, model_type, tmp_path):
    cfg = config(model_type, tmp_path / "nonexistent.pth")
    first, again, other = (build(cfg, seed, random_init=True).vit.state_dict() for seed in (3, 3, 4))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


# ---------------------------------------------------------------- configs and end to end


@pytest.mark.parametrize("overrides, match", [
    ({"arch": "vit_large_patch16_dinov3"}, r"'arch' must be one of \[.*\] for model_type 'dinov2', got "
                                           r"'vit_large_patch16_dinov3'"),
    ({"blocks": [20, 24]}, r"'blocks' must list 0-based indices of the 24 transformer blocks of "
                           r"vit_large_patch14_dinov2 \(0..23; the last four: \[20, 21, 22, 23\]\), got \[20, 24\]"),
    ({"blocks": []}, r"'blocks' must list 0-based indices"),
    ({"input_size": [112, 120]}, r"'input_size' must be \[height, width\], positive multiples of the patch \(14\), "
                                 r"got \[112, 120\]"),
    ({"input_size": [112]}, r"'input_size' must be \[height, width\]"),
    ({"input_size": 112}, r"'input_size' must be of type list"),
    ({"dim": [60, 60, 128]}, r"'dim' \[60, 60\] is not a multiple of 8: give 'input_size'"),
    ({"dim": [SIZE, SIZE, 4096]}, r"'dim'\[2\] must be 128 \(4 blocks x 32 channels of vit_large_patch14_dinov2\), "
                                  r"got 4096"),
    ({"input_activations": True}, r"'input_activations' must be false for model_type 'dinov2'"),
    ({"final_norm": "yes"}, r"'final_norm' must be of type bool"),
])
def test_unusable_config_values_are_refused_naming_the_key(tiny, overrides, match):
    with pytest.raises(ValueError, match=r"^x.json: " + match):
        validate_experiment(config("dinov2", "unused.pth", **overrides), "x.json")


def test_dino_keys_belong_to_dino_only():
    cfg = dict(config("dinov2", "m.pth"), model_type="mae", blocks=[], dim=[SIZE, SIZE, 12288], arch=VITL14)
    with pytest.raises(ValueError, match=r"'arch' applies only to model_type \['dinov2', 'dinov3'\], not 'mae'"):
        validate_experiment(cfg)


@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_configs_follow_the_ddpm_config(dataset):
    ddpm = load_experiment(str(REPO / "experiments" / dataset / "ddpm.json"))
    cfg = load_experiment(str(REPO / "experiments" / dataset / "dinov2.json"))
    assert cfg.to_dict() == dict(ddpm.to_dict(), model_type="dinov2", exp_dir=f"pixel_classifiers/{dataset}/dinov2",
                                 model_path="checkpoints/dinov2/dinov2_vitl14_pretrain.pth", dim=[256, 256, 4096],
                                 steps=[], blocks=LAST_FOUR, input_activations=False, arch=VITL14,
                                 input_size=[448, 448], final_norm=True)


@pytest.fixture
def data(tmp_path):
    return write_splits(tmp_path / "data", {"train": 2, "test": 2}, size=SIZE, bar=SIZE // 4)


@pytest.mark.parametrize("name, random_init", [("meta", False), ("timm_dinov3", False), ("meta", True)])
def test_train_interpreter_end_to_end(released, data, tmp_path, name, random_init):
    path, keys, _ = released[name]
    model_type = keys["model_type"]
    cfg = config(model_path="/nonexistent/model.pth" if random_init else path, **keys, exp_dir=str(tmp_path / "runs"),
                 training_path=str(data / "train"), testing_path=str(data / "test"))
    folder, metrics = train_interpreter(cfg, tmp_path / f"{model_type}.json", *(["--random_init"] if random_init else []))
    assert folder == tmp_path / "runs" / ("random_init" if random_init else "") / "seed_0"
    assert metrics["model_type"] == model_type and metrics["random_init"] == random_init
    # As for MAE's small ViT (tests/test_backbones.py): coarse 8x8 maps of a narrow random network, well above
    # labelling everything background (about 0.24), noisy with 2 training images.
    assert metrics["miou"] > 0.35
    assert np.load(folder / "predictions" / "000.npy").shape == (SIZE, SIZE)
    assert os.path.isfile(folder / "model_1.pth")
