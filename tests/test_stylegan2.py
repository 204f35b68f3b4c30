"""StyleGAN2 generator and GAN Inversion: the public file formats (TensorFlow and StyleGAN2-ADA pickles, read
without running their code), the paper-size architecture vs key listings written from the public sources, the
generator's numbers vs an independent per-sample computation, inversion, and train-interpreter end to end.

Models that compute are tiny (a 32x32 generator, 16 channels at most); the paper-size models are only built on
the meta device.
"""

import collections
import math
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from ddpm_seg.backbones import create_feature_extractor, gan_inversion, stylegan2
from ddpm_seg.backbones.stylegan2 import create_generator, load_generator, save_generator
from ddpm_seg.config import load_experiment, validate_experiment
from ddpm_seg.lpips import LPIPS, load_lpips
from ddpm_seg.safe_pickle import PersistentObject, load_pickle
from guided_diffusion.checkpoint import CheckpointError
from interpreter_runs import train_interpreter

REPO = Path(__file__).resolve().parent.parent
KEYS = REPO / "tests" / "fixtures" / "keys"
TINY = dict(stylegan2.CONFIG_F, z_dim=8, w_dim=8, img_resolution=32, channel_base=128, channel_max=16,
            mapping_layers=2)  # channels 16, 16, 8, 4 at 4, 8, 16, 32
SIZE = 32


def read_listing(path):
    with open(path) as f:
        return [tuple(line.rstrip("\n").split("\t")) for line in f if not line.startswith("#")]


def listing(state_dict):
    return [(k, ",".join(str(s) for s in v.shape)) for k, v in state_dict.items()]


def tiny_generator(seed=0):
    """A tiny generator whose zero-initialised entries (biases, noise strengths, w_avg) are random too, so that
    each of them shows in the numbers."""
    torch.manual_seed(seed)
    generator = create_generator(TINY)
    with torch.no_grad():
        for key, value in generator.state_dict().items():
            if key.endswith(("bias", "noise_strength", "w_avg")):
                value.normal_(0, 0.5)
    return generator.eval().requires_grad_(False)


# --------------------------------------------------------------------------- fake foreign modules and pickles

@pytest.fixture
def foreign_modules(monkeypatch):
    """Modules named as in NVIDIA's pickles (dnnlib.tflib.network.Network, torch_utils.persistence,
    dnnlib.util.EasyDict), registered only while a test writes its files: the stand-ins below."""

    class Network:
        def __init__(self, state):
            self.state = state

        def __getstate__(self):
            return self.state

    class EasyDict(dict):
        pass

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called: the files are only written here")

    names = ("dnnlib", "dnnlib.tflib", "dnnlib.tflib.network", "dnnlib.util", "torch_utils", "torch_utils.persistence")
    modules = {name: types.ModuleType(name) for name in names}
    for cls, module in ((Network, "dnnlib.tflib.network"), (EasyDict, "dnnlib.util")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    modules["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(Network=Network, EasyDict=EasyDict, reconstruct=_reconstruct_persistent_obj)


def tf_variables_of(generator):
    """{TF name: array} of `generator` as StyleGAN2's TensorFlow Gs stores it (written from
    networks_stylegan2.py: dense weights [in, out], conv weights [k, k, in, out], the upsampling conv flipped,
    mod_bias without the +1 added at run time, noise inputs [1, 1, r, r])."""
    sd = {k: v.numpy() for k, v in generator.state_dict().items()}
    variables = {"dlatent_avg": sd["mapping.w_avg"], "lod": np.float32(0)}
    for i in range(TINY["mapping_layers"]):
        variables[f"mapping/Dense{i}/weight"] = sd[f"mapping.fc{i}.weight"].T
        variables[f"mapping/Dense{i}/bias"] = sd[f"mapping.fc{i}.bias"]
    noise = 0
    for r in (4, 8, 16, 32):
        scope = f"synthesis/{r}x{r}"
        if r == 4:
            variables[f"{scope}/Const/const"] = sd["synthesis.b4.const"][None]
        for layer, tf in ((("conv1", "Conv"),) if r == 4 else (("conv0", "Conv0_up"), ("conv1", "Conv1"))):
            ours = f"synthesis.b{r}.{layer}"
            weight = sd[f"{ours}.weight"].transpose(2, 3, 1, 0)
            variables[f"{scope}/{tf}/weight"] = weight[::-1, ::-1] if layer == "conv0" else weight
            variables[f"{scope}/{tf}/mod_weight"] = sd[f"{ours}.affine.weight"].T
            variables[f"{scope}/{tf}/mod_bias"] = sd[f"{ours}.affine.bias"] - 1
            variables[f"{scope}/{tf}/noise_strength"] = sd[f"{ours}.noise_strength"]
            variables[f"{scope}/{tf}/bias"] = sd[f"{ours}.bias"]
            variables[f"synthesis/noise{noise}"] = sd[f"{ours}.noise_const"][None, None]
            noise += 1
        variables[f"{scope}/ToRGB/weight"] = sd[f"synthesis.b{r}.torgb.weight"].transpose(2, 3, 1, 0)
        variables[f"{scope}/ToRGB/mod_weight"] = sd[f"synthesis.b{r}.torgb.affine.weight"].T
        variables[f"{scope}/ToRGB/mod_bias"] = sd[f"synthesis.b{r}.torgb.affine.bias"] - 1
        variables[f"{scope}/ToRGB/bias"] = sd[f"synthesis.b{r}.torgb.bias"]
    return {k: np.array(v) for k, v in variables.items()}


TF_STATIC_KWARGS = dict(latent_size=8, dlatent_size=8, resolution=32, fmap_base=64, fmap_max=16, mapping_layers=2,
                        num_channels=3, label_size=0, truncation_psi=0.5)  # fmap_base 64 = channel_base 128 / 2


def tf_network(Network, name, variables, static_kwargs=None, components=None):
    return Network(dict(version=4, name=name, static_kwargs=static_kwargs or {}, components=components or {},
                        build_module_src="import os\nos.system('echo built')\n", build_func_name=f"G_{name}",
                        variables=list(variables.items())))


def write_tf_pickle(path, generator, fakes, drop=(), extra=None):
    """A TensorFlow-style (G, D, Gs) pickle of `generator` (G = Gs here; D is an empty network)."""
    variables = {k: v for k, v in tf_variables_of(generator).items() if k not in drop}
    variables.update(extra or {})
    part = {c: {k.split("/", 1)[1]: v for k, v in variables.items() if k.startswith(c + "/")}
            for c in ("mapping", "synthesis")}
    own = {k: v for k, v in variables.items() if "/" not in k}
    gs = tf_network(fakes.Network, "G", own, TF_STATIC_KWARGS,
                    {c: tf_network(fakes.Network, f"G_{c}", part[c]) for c in part})
    with open(path, "wb") as f:
        pickle.dump((gs, tf_network(fakes.Network, "D", {}), gs), f, protocol=3)


class Persistent:
    """Pickles as torch_utils.persistence does: a reconstructor call with a meta dict carrying module source."""

    def __init__(self, reconstruct, class_name, state):
        self.reconstruct, self.meta = reconstruct, dict(type="class", version=6, class_name=class_name, state=state,
                                                        module_src="import os\nos.system('echo rebuilt')\n")

    def __reduce__(self):
        return self.reconstruct, (self.meta,)


def persistent_module(module, fakes, class_name, init_kwargs=None):
    """A torch module's pickled __dict__ as StyleGAN2-ADA has it: parameters (as Parameters), buffers,
    persistent child modules, numpy gains, the set of non-persistent buffers, init kwargs."""
    state = dict(training=False, _parameters=collections.OrderedDict(
        (k, torch.nn.Parameter(v.clone(), requires_grad=False)) for k, v in module._parameters.items()),
        _buffers=collections.OrderedDict((k, v.clone()) for k, v in module._buffers.items()),
        _non_persistent_buffers_set=set(), _forward_hooks=collections.OrderedDict(),
        _modules=collections.OrderedDict((k, persistent_module(m, fakes, type(m).__name__))
                                         for k, m in module._modules.items()),
        weight_gain=np.float64(getattr(module, "weight_gain", 1.0)),
        _init_kwargs=fakes.EasyDict(init_kwargs or {}))
    return Persistent(fakes.reconstruct, class_name, state)


ADA_INIT_KWARGS = dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=32, img_channels=3,
                       mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=128, channel_max=16,
                                                                                num_fp16_res=4, conv_clamp=256))


def write_ada_pickle(path, generator, fakes, init_kwargs=ADA_INIT_KWARGS, extra=None):
    """A StyleGAN2-ADA-style pickle {G, D, G_ema, augment_pipe, training_set_kwargs} (protocol 2, as old
    pickles are: bytes through _codecs.encode, sets through __builtin__.set)."""
    g = persistent_module(generator, fakes, "Generator", fakes.EasyDict(init_kwargs))
    data = dict(G=g, D=Persistent(fakes.reconstruct, "Discriminator", {"_parameters": {}}), G_ema=g,
                augment_pipe=None, training_set_kwargs=fakes.EasyDict(resolution=32), **(extra or {}))
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)


class WritesAFile:
    """A pickle payload that, if unpickled by plain pickle, runs a shell command writing `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.path}",)


# ------------------------------------------------------------------------ architecture vs the public listings

def test_paper_size_generator_has_the_stylegan2_ada_g_ema_keys_and_shapes_line_by_line():
    generator = create_generator("stylegan2-ffhq-config-f", "meta")
    assert listing(generator.state_dict()) == read_listing(KEYS / "stylegan2_ada_ffhq1024_G_ema.txt")
    assert (generator.z_dim, generator.w_dim, generator.num_ws, generator.img_resolution) == (512, 512, 18, 1024)


def test_tf_config_f_variables_convert_to_exactly_the_generator_keys_and_shapes():
    """Every variable of the published config-F Gs listing is used, and lands on a key of the right shape."""
    tf = read_listing(KEYS / "stylegan2_tf_ffhq_config_f_Gs.txt")
    generator = create_generator("stylegan2-ffhq-config-f", "meta")
    names = stylegan2.tf_variable_names(generator.arguments)
    shapes = {k: tuple(int(s) for s in shape.split(",") if s) for k, shape in tf}
    assert {tf_name for tf_name, _ in names.values()} == set(shapes) - {"lod"}
    for key, value in generator.state_dict().items():
        if key.endswith("resample_filter"):
            continue  # not stored by TensorFlow
        tf_name, how = names[key]
        converted = stylegan2.TF_CONVERSIONS[how](np.broadcast_to(np.float32(0), shapes[tf_name]))
        assert converted.shape == tuple(value.shape), key


# ---------------------------------------------------------------------- numbers vs an independent computation

def naive_mapping(sd, z, layers=TINY["mapping_layers"]):
    x = z / z.square().mean(1, keepdim=True).add(1e-8).sqrt()
    for i in range(layers):
        weight, bias = sd[f"mapping.fc{i}.weight"], sd[f"mapping.fc{i}.bias"]
        x = F.leaky_relu(x @ (weight * 0.01 / math.sqrt(weight.shape[1])).T + bias * 0.01, 0.2) * math.sqrt(2)
    return x


def blur_kernel():
    taps = torch.tensor([1.0, 3, 3, 1])
    return torch.outer(taps, taps) / 64


def naive_upsample_image(image):
    """Zeros inserted after each pixel, padded (2, 1), filtered by 4 * [1,3,3,1]^2 / 64: upfirdn2d.upsample2d."""
    c, h, w = image.shape
    up = torch.zeros(c, 2 * h, 2 * w)
    up[:, ::2, ::2] = image
    return F.conv2d(F.pad(up, [2, 1, 2, 1])[:, None], 4 * blur_kernel()[None, None])[:, 0]


def naive_layer(sd, prefix, x, w, up):
    """One synthesis layer for ONE sample x [I, h, w], from its own modulated/demodulated weight."""
    affine_w, affine_b = sd[f"{prefix}.affine.weight"], sd[f"{prefix}.affine.bias"]
    style = affine_w @ w / math.sqrt(affine_w.shape[1]) + affine_b
    weight = sd[f"{prefix}.weight"] * style[None, :, None, None]
    weight = weight / weight.square().sum([1, 2, 3], keepdim=True).add(1e-8).sqrt()
    if up:  # transposed stride-2 conv = zeros between pixels, full padding, flipped kernel; then the blur
        c, h, wd = x.shape
        spread = torch.zeros(c, 2 * h - 1, 2 * wd - 1)
        spread[:, ::2, ::2] = x
        y = F.conv2d(F.pad(spread, [2, 2, 2, 2])[None], weight.flip([2, 3]))[0]
        y = F.conv2d(F.pad(y, [1, 1, 1, 1])[:, None], 4 * blur_kernel()[None, None])[:, 0]
    else:
        y = F.conv2d(x[None], weight, padding=1)[0]
    y = y + sd[f"{prefix}.noise_const"] * sd[f"{prefix}.noise_strength"] + sd[f"{prefix}.bias"][:, None, None]
    return F.leaky_relu(y, 0.2) * math.sqrt(2)


def naive_torgb(sd, prefix, x, w):
    affine_w, affine_b = sd[f"{prefix}.affine.weight"], sd[f"{prefix}.affine.bias"]
    style = (affine_w @ w / math.sqrt(affine_w.shape[1]) + affine_b) / math.sqrt(x.shape[0])
    weight = sd[f"{prefix}.weight"][:, :, 0, 0] * style[None]
    return torch.einsum("oi,ihw->ohw", weight, x) + sd[f"{prefix}.bias"][:, None, None]


def naive_synthesis(sd, ws):
    """(image, {resolution: block output}) of one sample, ws [num_ws, w_dim]."""
    x = naive_layer(sd, "synthesis.b4.conv1", sd["synthesis.b4.const"], ws[0], up=False)
    image, maps = naive_torgb(sd, "synthesis.b4.torgb", x, ws[1]), {4: x}
    for i, r in enumerate((8, 16, 32)):
        x = naive_layer(sd, f"synthesis.b{r}.conv0", x, ws[1 + 2 * i], up=True)
        x = naive_layer(sd, f"synthesis.b{r}.conv1", x, ws[2 + 2 * i], up=False)
        image, maps[r] = naive_upsample_image(image) + naive_torgb(sd, f"synthesis.b{r}.torgb", x, ws[3 + 2 * i]), x
    return image, maps


def test_generator_image_and_block_maps_match_a_naive_per_sample_modulated_convolution():
    generator = tiny_generator()
    sd = generator.state_dict()
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    ws = generator.mapping(z)
    assert ws.shape == (2, 8, 8) and torch.allclose(ws[:, 0], naive_mapping(sd, z), atol=1e-5)
    assert torch.equal(ws[:, 0], ws[:, 5])
    truncated = generator.mapping(z, truncation_psi=0.5)
    assert torch.allclose(truncated, sd["mapping.w_avg"] + 0.5 * (ws - sd["mapping.w_avg"]), atol=1e-6)
    ws = ws + 0.3 * torch.randn(ws.shape, generator=torch.Generator().manual_seed(2))  # a different w per layer
    image, maps = generator.synthesis(ws, read=(8, 32))
    assert image.shape == (2, 3, 32, 32) and [tuple(m.shape) for m in maps] == [(2, 16, 8, 8), (2, 4, 32, 32)]
    for n in range(2):
        naive_image, naive_maps = naive_synthesis(sd, ws[n])
        assert torch.allclose(image[n], naive_image, atol=1e-4), (image[n] - naive_image).abs().max()
        assert torch.allclose(maps[0][n], naive_maps[8], atol=1e-4)
        assert torch.allclose(maps[1][n], naive_maps[32], atol=1e-4)
    again, _ = generator.synthesis(ws)
    assert torch.equal(again, image)  # constant noise: deterministic


def test_conv_clamp_clamps_every_layer_output():
    generator = tiny_generator()
    clamped = create_generator(dict(TINY, conv_clamp=0.5))
    clamped.load_state_dict(generator.state_dict())
    ws = generator.mapping(torch.randn(1, 8))
    image, (x,) = clamped.synthesis(ws, read=(16,))
    assert x.abs().max() <= 0.5 and not torch.equal(image, generator.synthesis(ws)[0])


# -------------------------------------------------------------------------------------- public file formats

def test_tensorflow_pickle_converts_to_the_same_generator(tmp_path, foreign_modules):
    generator = tiny_generator()
    write_tf_pickle(tmp_path / "tf.pkl", generator, foreign_modules)
    loaded = load_generator(str(tmp_path / "tf.pkl"), "cpu")
    assert loaded.arguments == generator.arguments
    ws = generator.mapping(torch.randn(2, 8))
    assert torch.allclose(loaded.mapping(torch.ones(1, 8)), generator.mapping(torch.ones(1, 8)))
    assert torch.allclose(loaded.synthesis(ws)[0], generator.synthesis(ws)[0], atol=1e-5)


def test_stylegan2_ada_pickle_converts_g_ema_with_its_init_kwargs(tmp_path, foreign_modules):
    generator = tiny_generator()
    write_ada_pickle(tmp_path / "ada.pkl", generator, foreign_modules)
    loaded = load_generator(str(tmp_path / "ada.pkl"))
    assert loaded.arguments == dict(generator.arguments, conv_clamp=256)
    assert listing(loaded.state_dict()) == listing(generator.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), generator.state_dict().values()))


def test_converted_generator_file_loads_with_weights_only(tmp_path):
    generator = tiny_generator()
    save_generator(generator, tmp_path / "g.pt")
    loaded = load_generator(str(tmp_path / "g.pt"))
    assert loaded.arguments == generator.arguments
    ws = generator.mapping(torch.randn(1, 8))
    assert torch.equal(loaded.synthesis(ws)[0], generator.synthesis(ws)[0])


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    target = tmp_path / "written_by_the_pickle"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"G_ema": WritesAFile(target)}, f)
    with pytest.raises(CheckpointError) as error:
        load_generator(str(path))
    assert not target.exists()
    message = str(error.value)
    assert "\n" not in message and str(path) in message and f"{os.system.__module__}.system" in message
    assert pickle.loads(path.read_bytes()) == {"G_ema": 0} and target.exists()  # what plain pickle would have done


def test_code_hidden_inside_an_ada_pickle_is_refused(tmp_path, foreign_modules):
    target = tmp_path / "written_by_the_pickle"
    write_ada_pickle(tmp_path / "ada.pkl", tiny_generator(), foreign_modules, extra={"progress": WritesAFile(target)})
    with pytest.raises(CheckpointError, match=r"names the global (posix|nt)\.system"):
        load_generator(str(tmp_path / "ada.pkl"))
    assert not target.exists()


def test_the_stored_module_source_is_never_executed(tmp_path, foreign_modules, capfd):
    write_tf_pickle(tmp_path / "tf.pkl", tiny_generator(), foreign_modules)
    write_ada_pickle(tmp_path / "ada.pkl", tiny_generator(), foreign_modules)
    data = load_pickle(str(tmp_path / "ada.pkl"))
    assert data["G_ema"].class_name == "Generator"
    assert isinstance(data["G_ema"].state["_modules"]["synthesis"], PersistentObject)
    load_generator(str(tmp_path / "tf.pkl"))
    load_generator(str(tmp_path / "ada.pkl"))
    assert "built" not in capfd.readouterr().out


@pytest.mark.parametrize("fault, match", [
    ("missing", r"missing TF variables \['synthesis/32x32/Conv1/bias'\]"),
    ("unexpected", r"unexpected \['synthesis/64x64/Conv1/bias'\]"),
    ("shape", r"synthesis\.b8\.conv1\.bias: checkpoint \(5,\) vs model \(16,\)"),
])
def test_a_tf_pickle_with_wrong_variables_is_refused_naming_them(tmp_path, foreign_modules, fault, match):
    generator = tiny_generator()
    drop, extra = (), {}
    if fault == "missing":
        drop = ("synthesis/32x32/Conv1/bias",)
    elif fault == "unexpected":
        extra = {"synthesis/64x64/Conv1/bias": np.zeros(4, np.float32)}
    else:
        extra = {"synthesis/8x8/Conv1/bias": np.zeros(5, np.float32)}
    write_tf_pickle(tmp_path / "tf.pkl", generator, foreign_modules, drop=drop, extra=extra)
    with pytest.raises(CheckpointError, match=match):
        load_generator(str(tmp_path / "tf.pkl"))


def test_unsupported_generator_settings_are_refused(tmp_path, foreign_modules):
    kwargs = dict(ADA_INIT_KWARGS, c_dim=10)
    write_ada_pickle(tmp_path / "ada.pkl", tiny_generator(), foreign_modules, init_kwargs=kwargs)
    with pytest.raises(CheckpointError, match=r"c_dim=10 is not supported"):
        load_generator(str(tmp_path / "ada.pkl"))


def test_truncated_foreign_and_wrong_files_are_refused_with_one_line(tmp_path, foreign_modules):
    write_ada_pickle(tmp_path / "ada.pkl", tiny_generator(), foreign_modules)
    data = (tmp_path / "ada.pkl").read_bytes()
    (tmp_path / "truncated.pkl").write_bytes(data[: len(data) // 2])
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with open(tmp_path / "list.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "state_dict.pt")
    cases = {"truncated.pkl": "truncated or corrupt", "image.png": "is not a PyTorch checkpoint",
             "list.pkl": "expected a TensorFlow", "state_dict.pt": "save_generator writes it"}
    for name, expected in cases.items():
        with pytest.raises(CheckpointError) as error:
            load_generator(str(tmp_path / name))
        assert expected in str(error.value) and str(tmp_path / name) in str(error.value)
        assert "\n" not in str(error.value), str(error.value)
    with pytest.raises(FileNotFoundError):
        load_generator(str(tmp_path / "absent.pkl"))


def test_a_converted_file_with_wrong_keys_is_refused_listing_them(tmp_path):
    generator = tiny_generator()
    state_dict = generator.state_dict()
    state_dict["synthesis.b64.conv1.weight"] = state_dict.pop("synthesis.b32.conv1.weight")
    torch.save({"arguments": dict(generator.arguments, resample_filter=[1, 3, 3, 1]), "state_dict": state_dict},
               tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(1\).*synthesis\.b32\.conv1\.weight.*"
                                              r"unexpected keys \(1\).*synthesis\.b64\.conv1\.weight"):
        load_generator(str(tmp_path / "g.pt"))


# ------------------------------------------------------------------------------------------------ LPIPS

def test_lpips_has_torchvision_vgg16_features_and_the_lpips_v0_1_linear_layers():
    with torch.device("meta"):
        model = LPIPS()
        vgg = torchvision.models.vgg16()
    assert listing(model.features.state_dict()) == listing(vgg.features.state_dict())
    lins = {k: v for k, v in model.state_dict().items() if k.startswith("lin")}
    assert listing(lins) == read_listing(KEYS / "stylegan2_projector_lpips_v0.1_vgg.txt")


def write_lpips_files(tmp_path):
    """A torchvision-layout vgg16 state_dict (its classifier included) and an LPIPS v0.1 vgg.pth, random."""
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    vgg = {f"features.{k}": v for k, v in features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # ignored: only the convolutional part is used
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
               tmp_path / "lpips_vgg.pth")
    return features, tmp_path / "vgg16.pth", tmp_path / "lpips_vgg.pth"


def test_lpips_distance_matches_an_independent_computation(tmp_path):
    features, vgg_path, lin_path = write_lpips_files(tmp_path)
    model = load_lpips(str(vgg_path), str(lin_path))
    lins = torch.load(lin_path, weights_only=True)
    x, y = torch.rand(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = torch.zeros(2)
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
    a, b = (x - shift[:, None, None]) / scale[:, None, None], (y - shift[:, None, None]) / scale[:, None, None]
    k = 0
    for i, layer in enumerate(features):
        a, b = layer(a), layer(b)
        if isinstance(layer, torch.nn.ReLU) and i in (3, 8, 15, 22, 29):  # relu1_2 ... relu5_3
            na = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            nb = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            weights = lins[f"lin{k}.model.1.weight"][0, :, 0, 0]
            expected += ((na - nb) ** 2 * weights[:, None, None]).sum(1).mean([1, 2])
            k += 1
    assert k == 5
    assert torch.allclose(model(x, y), expected, rtol=1e-4)
    assert torch.allclose(model(x, x), torch.zeros(2))


def test_lpips_files_are_loaded_strictly(tmp_path):
    _, vgg_path, lin_path = write_lpips_files(tmp_path)
    lins = torch.load(lin_path, weights_only=True)
    lins["lin5.model.1.weight"] = torch.zeros(1, 512, 1, 1)
    torch.save(lins, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"(?s)extra\.pth.*unexpected keys \(1\).*lin5\.model\.1\.weight"):
        load_lpips(str(vgg_path), str(tmp_path / "extra.pth"))


# --------------------------------------------------------------------------------------------- inversion

def generated_image(generator, seed=5):
    """uint8 [32, 32, 3] of a random w (and the tensor in [-1, 1] it rounds)."""
    ws = generator.mapping(torch.randn(1, 8, generator=torch.Generator().manual_seed(seed)))
    image = generator.synthesis(ws)[0].clamp(-1, 1)
    return ((image[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()


def inversion(generator, **options):
    options = {**gan_inversion.INVERSION_DEFAULTS, "perceptual_loss": "mse", "inversion_steps": 40, **options}
    return gan_inversion.GANInversionFeatures(generator, None, [8, 32], options, seed=0)


@pytest.mark.parametrize("latent_space, optimize_noise", [("w", True), ("w+", False)])
def test_inversion_reconstructs_a_generated_image_better_than_w_avg(latent_space, optimize_noise):
    generator = tiny_generator()
    image = generated_image(generator)
    target = gan_inversion.image_tensor(image, "cpu", "symmetric")
    features = inversion(generator, latent_space=latent_space, optimize_noise=optimize_noise)
    with torch.enable_grad():
        ws, noise = features.project(target, image[None])
    assert ws.shape == (1, generator.num_ws, 8) and (noise is not None) == optimize_noise
    if latent_space == "w":
        assert torch.equal(ws[:, 0], ws[:, -1])
    start = generator.synthesis(generator.w_avg[None, None].expand(1, generator.num_ws, 8))[0]
    reconstructed = generator.synthesis(ws, noise=noise)[0]
    assert (reconstructed - target).square().mean() < 0.6 * (start - target).square().mean()


def test_inversion_loss_decreases_and_follows_the_projector_schedule():
    assert gan_inversion.learning_rate(0, 1000, 0.1) == 0
    assert gan_inversion.learning_rate(25, 1000, 0.1) == pytest.approx(0.05)  # half-way up the 5% ramp
    assert gan_inversion.learning_rate(500, 1000, 0.1) == pytest.approx(0.1)
    assert gan_inversion.learning_rate(875, 1000, 0.1) == pytest.approx(0.05)  # half-way down the cosine ramp
    generator = tiny_generator()
    image = generated_image(generator)
    target = gan_inversion.image_tensor(image, "cpu", "symmetric")
    losses = []
    for steps in (1, 10, 40):
        with torch.enable_grad():
            ws, _ = inversion(generator, inversion_steps=steps, optimize_noise=False).project(target, image[None])
        losses.append(float((generator.synthesis(ws)[0] - target).square().mean()))
    assert losses[0] > losses[1] > losses[2]


def test_inversion_features_are_the_block_outputs_of_the_inverted_latent_and_repeat_exactly():
    generator = tiny_generator()
    images = np.stack([generated_image(generator, seed) for seed in (5, 6)])
    features = inversion(generator, inversion_steps=5)
    maps = features(images)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 8, 8), (2, 4, 32, 32)]
    assert all(m.dtype == torch.float32 for m in maps)
    with torch.enable_grad():
        ws, noise = features.project(gan_inversion.image_tensor(images[1:], "cpu", "symmetric"), images[1:])
    _, expected = generator.synthesis(ws, read=(8, 32), noise=noise)
    alone = features(images[1])  # the same image alone: the same inversion (seeded by its pixels)
    for m, e, a in zip(maps, expected, alone):
        assert torch.allclose(m[1], e[0], atol=1e-5) and torch.allclose(a, m[1], atol=1e-5)
    assert not torch.allclose(maps[0][0], maps[0][1])
    other_seed = gan_inversion.GANInversionFeatures(generator, None, [8, 32], features.options, seed=1)
    assert not torch.allclose(other_seed(images[1])[0], alone[0])


def test_bf16_generator_and_bf16_features_stay_close_to_float32():
    generator = tiny_generator()
    ws = generator.mapping(torch.randn(1, 8))
    image = generator.synthesis(ws)[0]
    half = tiny_generator().to(torch.bfloat16)
    assert torch.allclose(half.synthesis(ws)[0].float(), image, atol=0.15 * float(image.abs().max()))
    image_u8 = generated_image(generator)
    options = {**gan_inversion.INVERSION_DEFAULTS, "perceptual_loss": "mse", "inversion_steps": 5}
    maps = gan_inversion.GANInversionFeatures(generator, None, [8], options, seed=0)(image_u8)
    maps_bf16 = gan_inversion.GANInversionFeatures(generator, None, [8], options, seed=0, dtype=torch.bfloat16)(image_u8)
    assert maps_bf16[0].dtype == torch.float32
    assert torch.allclose(maps_bf16[0], maps[0], atol=0.05 * float(maps[0].abs().max()))


def test_inversion_downsamples_the_generated_image_to_the_input_size():
    generator = tiny_generator()
    features = inversion(generator)
    assert features.loss_size(16) == 16 and features.loss_size(64) == 32
    big = gan_inversion.GANInversionFeatures(generator, torch.nn.Identity(), [8], features.options, seed=0)
    assert big.loss_size(1024) == 32
    image = np.ascontiguousarray(generated_image(generator)[::2, ::2])  # a 16x16 input
    maps = features(image)
    assert [tuple(m.shape) for m in maps] == [(16, 8, 8), (4, 32, 32)]


# ------------------------------------------------------------------------------- configs and end to end

def config(model_path, **overrides):
    return {"exp_dir": "unused", "model_type": "gan_inversion", "number_class": 3, "ignore_label": 255,
            "training_path": "unused", "testing_path": "unused", "model_path": str(model_path),
            "dim": [SIZE, SIZE, 28], "steps": [], "blocks": [8, 16, 32], "model_num": 2, "batch_size": 64,
            "training_number": 2, "testing_number": 2, "upsample_mode": "bilinear", "share_noise": True,
            "input_activations": False, "inversion_steps": 30, "latent_space": "w+", "perceptual_loss": "mse",
            **overrides}


@pytest.mark.parametrize("dataset, network", [("ffhq_34", "ffhq"), ("celeba_19", "ffhq"), ("cat_15", "cat"),
                                              ("horse_21", "horse")])
def test_experiment_configs_load_and_read_a_public_generator(dataset, network):
    cfg = load_experiment(str(REPO / "experiments" / dataset / "gan_inversion.json"))
    ddpm = load_experiment(str(REPO / "experiments" / dataset / "ddpm.json"))
    assert cfg.model_path == f"checkpoints/stylegan2/stylegan2-{network}-config-f.pkl"
    assert cfg.backbone_options["generator"] == f"stylegan2-{network}-config-f"
    generator = create_generator(cfg.backbone_options["generator"], "meta")
    assert cfg.dim[2] == sum(generator.synthesis.channels[r] for r in cfg.blocks) == 2944
    assert (cfg.training_path, cfg.testing_path, cfg.number_class) == (ddpm.training_path, ddpm.testing_path,
                                                                        ddpm.number_class)


@pytest.mark.parametrize("change, message", [
    (dict(latent_space="z"), r"'latent_space' must be one of \['w', 'w\+'\], got 'z'"),
    (dict(inversion_steps=0), r"'inversion_steps' must be >= 1, got 0"),
    (dict(inversion_lr=-0.1), r"'inversion_lr' must be positive"),
    (dict(perceptual_loss="l1"), r"'perceptual_loss' must be one of \['lpips', 'mse'\]"),
    (dict(perceptual_loss="lpips"), r"perceptual_loss 'lpips' needs 'perceptual_vgg16_path'"),
    (dict(perceptual_vgg16_path="vgg.pth"), r"apply only to perceptual_loss 'lpips', not 'mse'"),
    (dict(blocks=[8, 12]), r"'blocks' must list generator resolutions .* got \[8, 12\]"),
    (dict(blocks=[]), r"'blocks' must list generator resolutions"),
    (dict(steps=[50]), r"'steps' must be \[\] for gan_inversion"),
    (dict(dim=[32, 64, 28]), r"needs square images"),
    (dict(generator="stylegan3"), r"'generator' must name a StyleGAN2 architecture"),
    (dict(inversion_lr=1), r"'inversion_lr' must be of type float"),
])
def test_unusable_inversion_settings_are_refused_with_one_line(change, message):
    with pytest.raises(ValueError, match=message) as error:
        validate_experiment(config("g.pkl", **change), "exp.json")
    assert str(error.value).startswith("exp.json: ") and "\n" not in str(error.value)


def test_blocks_finer_than_the_generator_are_refused(tmp_path):
    save_generator(tiny_generator(), tmp_path / "g.pt")
    cfg = validate_experiment(config(tmp_path / "g.pt", blocks=[8, 64]))
    with pytest.raises(ValueError, match=r"blocks \[64\] exceed the generator's resolution 32"):
        create_feature_extractor(cfg, {}, torch.device("cpu"))


def test_random_init_builds_the_named_architecture_seeded(monkeypatch):
    monkeypatch.setitem(stylegan2.ARCHITECTURES, "stylegan2-cat-config-f", TINY)
    cfg = validate_experiment(config("/nonexistent/g.pkl", generator="stylegan2-cat-config-f", inversion_steps=2))
    first, again = (create_feature_extractor(cfg, {}, torch.device("cpu"), seed=3, random_init=True) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.generator.state_dict().values(),
                                                 again.generator.state_dict().values()))
    with pytest.raises(ValueError, match="--random_init needs 'generator'"):
        create_feature_extractor(validate_experiment(config("/nonexistent/g.pkl")), {}, torch.device("cpu"),
                                 random_init=True)


def inverted_run_metrics(tmp_path, model_path, data, name, **overrides):
    cfg = config(model_path, exp_dir=str(tmp_path / name), training_path=str(data / "train"),
                 testing_path=str(data / "test"), **overrides)
    return train_interpreter(cfg, tmp_path / f"{name}.json")[1]


def unsaturated_generator():
    """The tiny generator with its ToRGB layers scaled down: its images stay inside [-1, 1], so that the uint8
    image files keep what the inversion needs (random ToRGB layers saturate most pixels)."""
    generator = tiny_generator()
    with torch.no_grad():
        for r in generator.synthesis.block_resolutions:
            torgb = getattr(generator.synthesis, f"b{r}").torgb
            torgb.weight *= 0.08
            torgb.bias *= 0.08
    return generator


def write_generated_splits(root, generator):
    """root/<train|test>/NNN.png + .npy: images the generator makes from random z (truncated to 0.5, as
    samples usually are), labelled by its own 32x32 block output there: the first channel's lowest third of
    values (over all images) 0, the middle third 1, the rest 2."""
    splits = {"train": (1, 2), "test": (3, 4)}
    images, scores = {}, {}
    for seed in (s for seeds in splits.values() for s in seeds):
        ws = generator.mapping(torch.randn(1, 8, generator=torch.Generator().manual_seed(seed)), truncation_psi=0.5)
        image, (x,) = generator.synthesis(ws, read=(32,))
        images[seed] = ((image[0].clamp(-1, 1).permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        scores[seed] = x[0, 0].numpy()
    thresholds = np.quantile(np.stack(list(scores.values())), [1 / 3, 2 / 3])
    for split, seeds in splits.items():
        (root / split).mkdir(parents=True)
        for i, seed in enumerate(seeds):
            Image.fromarray(images[seed]).save(root / split / f"{i:03d}.png")
            np.save(root / split / f"{i:03d}.npy", np.digitize(scores[seed], thresholds).astype(np.uint8))
    return root


def test_train_interpreter_end_to_end_on_a_tensorflow_pickle(tmp_path, foreign_modules):
    generator = unsaturated_generator()
    write_tf_pickle(tmp_path / "stylegan2-tiny.pkl", generator, foreign_modules)
    data = write_generated_splits(tmp_path / "data", generator)
    # In W, with the stored noise, 150 steps recover most of this generator's w of an image it made (the
    # inverted features correlate with the true ones at about 0.9), so a classifier reads the labels off the
    # features and carries them to the test images (0.75 here).
    metrics = inverted_run_metrics(tmp_path, tmp_path / "stylegan2-tiny.pkl", data, "runs", latent_space="w",
                                optimize_noise=False, inversion_steps=150)
    assert metrics["model_type"] == "gan_inversion"
    assert np.load(tmp_path / "runs" / "seed_0" / "predictions" / "000.npy").shape == (SIZE, SIZE)
    # Without inversion (one step, whose learning rate is 0) every image gets w_avg's features, which tell
    # only what all four images share (0.32 here).
    blind = inverted_run_metrics(tmp_path, tmp_path / "stylegan2-tiny.pkl", data, "blind", latent_space="w",
                              optimize_noise=False, inversion_steps=1)
    assert metrics["miou"] > 0.6 and metrics["miou"] > blind["miou"] + 0.25
