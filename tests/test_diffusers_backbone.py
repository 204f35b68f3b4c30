"""The diffusers backbone on tiny random pipelines of each family, saved with save_pretrained (no downloads):
hooked maps equal the modules' outputs recomputed by hand, latent maps, noise draws, early stop, batching,
errors, and train-interpreter / sweep end to end."""

import json
import re
import shutil
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers extra: pip install -e '.[diffusers]'")
pytest.importorskip("transformers", reason="the diffusers extra: pip install -e '.[diffusers]'")

import diffusers  # noqa: E402
import transformers  # noqa: E402
from scenes import write_splits  # noqa: E402

from ddpm_seg.backbones import create_feature_extractor, hf_diffusion  # noqa: E402
from ddpm_seg.backbones.hf_diffusion import DiffusersFeatureExtractor, latent_shape, load_components  # noqa: E402
from ddpm_seg.benchmarks.stable_diffusion import ARCHS, feature_shapes  # noqa: E402
from ddpm_seg.cli import main as cli_main  # noqa: E402
from ddpm_seg.config import experiment_suffix, load_experiment, validate_experiment  # noqa: E402

SIZE = 32  # image side; the tiny VAEs halve it once, so latents are 16x16
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def clip_tokenizer(folder):
    """A CLIP BPE tokenizer over single letters, written offline."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def clip_text_encoder(hidden, with_projection=False):
    config = transformers.CLIPTextConfig(vocab_size=54, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                         projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(config).eval()


def tiny_vae():
    # scaling_factor brings this random encoder's latents (std ~0.28) to unit variance, as SD's 0.18215 does
    # for its own VAE; with the default the image would drown in the noise.
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                   norm_num_groups=4, sample_size=SIZE, scaling_factor=3.5)


def cond_unet(cross_dim, **extra):
    return diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=4, norm_num_groups=4, **extra)


def build_pipeline(family, folder):
    torch.manual_seed(0)
    schedule = dict(num_train_timesteps=100, beta_start=0.001, beta_end=0.02, beta_schedule="scaled_linear")
    if family == "pixel":
        unet = diffusers.UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
                                     block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                     attention_head_dim=8)
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**schedule))
    elif family == "sd":
        pipe = diffusers.StableDiffusionPipeline(
            vae=tiny_vae(), text_encoder=clip_text_encoder(16), tokenizer=clip_tokenizer(folder / "_tok"),
            unet=cond_unet(16), scheduler=diffusers.PNDMScheduler(**schedule, skip_prk_steps=True),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        # Two encoders (hidden 16 + 16 -> cross-attention 32), pooled projection 16, six size ids of 8 channels.
        unet = cond_unet(32, addition_embed_type="text_time", addition_time_embed_dim=8,
                         projection_class_embeddings_input_dim=6 * 8 + 16)
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=tiny_vae(), text_encoder=clip_text_encoder(16), text_encoder_2=clip_text_encoder(16, True),
            tokenizer=clip_tokenizer(folder / "_tok"), tokenizer_2=clip_tokenizer(folder / "_tok2"), unet=unet,
            scheduler=diffusers.EulerDiscreteScheduler(**schedule))
    elif family == "dit":
        transformer = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                      out_channels=8, num_layers=3, sample_size=SIZE // 2, patch_size=2,
                                                      num_embeds_ada_norm=10)
        pipe = diffusers.DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=diffusers.DDIMScheduler(**schedule))
    elif family == "pixart":
        vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + c, -1.0) for c in LETTERS]
        tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=12)
        encoder = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)).eval()
        transformer = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                         out_channels=8, num_layers=3, sample_size=SIZE // 2,
                                                         patch_size=2, cross_attention_dim=16, caption_channels=16)
        pipe = diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_vae(),
                                             transformer=transformer,
                                             scheduler=diffusers.DPMSolverMultistepScheduler(**schedule))
    pipe.save_pretrained(folder)
    return folder


FAMILIES = ("pixel", "sd", "sdxl", "dit", "pixart")
# Module names read per family: block outputs, attention-block outputs, self-attention queries/keys.
BLOCKS = {
    "pixel": ["up_blocks.0", "up_blocks.0.attentions.0.to_q", "up_blocks.1"],
    "sd": ["up_blocks.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
           "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"],
    "dit": ["transformer_blocks.0", "transformer_blocks.1.attn1.to_q"],
}
BLOCKS["sdxl"] = BLOCKS["sd"]
BLOCKS["pixart"] = BLOCKS["dit"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {f: str(build_pipeline(f, root / f)) for f in FAMILIES}


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def config(model_path, **overrides):
    cfg = {"exp_dir": "runs", "model_type": "diffusers", "number_class": 3, "ignore_label": 255,
           "training_path": "train", "testing_path": "test", "model_path": model_path, "dim": [SIZE, SIZE, 1],
           "steps": [10, 60], "blocks": ["up_blocks.1"], "model_num": 2, "batch_size": 64, "training_number": 4,
           "testing_number": 3, "upsample_mode": "bilinear", "share_noise": True, "input_activations": False}
    return dict(cfg, **overrides)


def extractor(model_path, **overrides):
    return create_feature_extractor(validate_experiment(config(model_path, **overrides)), {}, torch.device("cpu"),
                                    seed=0)


@torch.no_grad()
def by_hand(ext, parts, family, image, noise):
    """The named modules' outputs from a plain forward, every input computed here from the pipeline's parts:
    {name: [steps, C, h, w]}."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    if ext.vae is not None:
        x = ext.vae.encode(x).latent_dist.mean * ext.vae.config.scaling_factor
    steps = torch.tensor(ext.steps)
    alpha_bar = ext.scheduler.alphas_cumprod[steps][:, None, None, None]
    x_t = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise  # q(x_t | x_0)
    n = len(steps)
    kwargs = {}
    if family in ("sd", "sdxl"):
        ids = parts["tokenizer"]([""], padding="max_length", max_length=16, return_tensors="pt").input_ids
        if family == "sd":
            kwargs["encoder_hidden_states"] = parts["text_encoder"](ids)[0].expand(n, -1, -1)
        else:
            one = parts["text_encoder"](ids, output_hidden_states=True)
            two = parts["text_encoder_2"](ids, output_hidden_states=True)
            kwargs["encoder_hidden_states"] = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], -1).expand(n, -1, -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": two.text_embeds.expand(n, -1),
                                           "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * n).float()}
    elif family == "dit":
        kwargs["class_labels"] = torch.full((n,), 10)  # the null class of a 10-class DiT
    elif family == "pixart":
        tokens = parts["tokenizer"]([""], padding="max_length", max_length=12, return_tensors="pt")
        kwargs["encoder_hidden_states"] = parts["text_encoder"](tokens.input_ids, attention_mask=tokens.attention_mask)[0].expand(n, -1, -1)
        kwargs["encoder_attention_mask"] = tokens.attention_mask.expand(n, -1)
        kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    outputs = {}
    modules = dict(ext.denoiser.named_modules())
    handles = [modules[b].register_forward_hook(lambda m, i, o, b=b: outputs.__setitem__(b, o)) for b in ext.blocks]
    ext.denoiser(x_t, timestep=steps, **kwargs)
    for h in handles:
        h.remove()
    maps = {}
    for b, o in outputs.items():
        o = o[0] if isinstance(o, tuple) else o
        if o.ndim == 3:  # tokens, row-major over the grid
            side = int(round(o.shape[1] ** 0.5))
            o = o.permute(0, 2, 1).reshape(n, -1, side, side)
        maps[b] = o
    return maps


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_maps_equal_module_outputs_recomputed_by_hand(pipelines, family):
    parts = load_components(pipelines[family], torch.float32)
    noise = torch.randn(1, *latent_shape(parts, (SIZE, SIZE)))
    ext = DiffusersFeatureExtractor(parts, [10, 60], BLOCKS[family], noise=noise)
    image = images(1)[0]
    maps = ext(image)
    expected = by_hand(ext, parts, family, image, noise[0])
    assert len(maps) == 2 * len(BLOCKS[family])
    for s in range(2):
        for k, b in enumerate(BLOCKS[family]):
            got = maps[s * len(BLOCKS[family]) + k]
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, expected[b][s], rtol=1e-4, atol=1e-5)


def test_latent_models_give_maps_on_the_latent_grid(pipelines):
    blocks = ["down_blocks.0", "up_blocks.0", "up_blocks.1", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    sd = extractor(pipelines["sd"], blocks=blocks, steps=[10])(images(1)[0])
    # 32x32 image -> 16x16 latent; down_blocks.0 ends with its downsampler, up_blocks.0 with its upsampler.
    assert [tuple(m.shape) for m in sd] == [(16, 8, 8), (32, 16, 16), (16, 16, 16), (16, 16, 16)]
    pixel = extractor(pipelines["pixel"], blocks=["up_blocks.1"], steps=[10])(images(1)[0])
    assert tuple(pixel[0].shape) == (8, SIZE, SIZE)
    dit = extractor(pipelines["dit"], blocks=["transformer_blocks.2"], steps=[10])(images(1)[0])
    assert tuple(dit[0].shape) == (16, 8, 8)  # 16x16 latent in 2x2 patches, hidden size 2 heads x 8


@pytest.mark.parametrize("share_noise", [True, False])
def test_noise_draws_average_single_draws(pipelines, share_noise, monkeypatch):
    image = images(1)[0]
    real_image_noise = hf_diffusion.image_noise
    three = extractor(pipelines["sd"], blocks=BLOCKS["sd"], noise_draws=3, share_noise=share_noise)
    mean = three(image)
    one = extractor(pipelines["sd"], blocks=BLOCKS["sd"], share_noise=share_noise)
    singles = []
    for k in range(3):
        if share_noise:
            one.noise = three.noise[k:k + 1]
            singles.append(one(image))
        else:  # the image's own draw k, given to a one-draw extractor as its draw 0
            with monkeypatch.context() as patch:
                patch.setattr(hf_diffusion, "image_noise", lambda *a, k=k: real_image_noise(*a[:3], k, *a[4:]))
                singles.append(one(image))
    for i, m in enumerate(mean):
        torch.testing.assert_close(m, sum(s[i] for s in singles) / 3, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(singles[0][i], singles[1][i])  # the draws differ


def test_share_noise_makes_extraction_deterministic(pipelines):
    image = images(1)[0]
    shared = extractor(pipelines["sdxl"], blocks=BLOCKS["sdxl"])
    assert all(torch.equal(a, b) for a, b in zip(shared(image), shared(image)))
    again = extractor(pipelines["sdxl"], blocks=BLOCKS["sdxl"])  # the same seed gives the same noise
    assert all(torch.equal(a, b) for a, b in zip(shared(image), again(image)))
    # Without share_noise an image's noise is its own, seeded by the run's seed and its pixels: the same each time.
    fresh = extractor(pipelines["sdxl"], blocks=BLOCKS["sdxl"], share_noise=False)
    assert torch.equal(fresh(image)[0], fresh(image)[0]) and not torch.equal(fresh(image)[0], shared(image)[0])
    other = images(1, seed=1)[0]
    assert torch.allclose(fresh(np.stack([other, image]))[0][1], fresh(image)[0], atol=1e-5)


def test_forward_stops_after_the_last_named_module(pipelines):
    ext = extractor(pipelines["sd"], blocks=["up_blocks.0", "down_blocks.1"])
    ran = []
    ext.denoiser.up_blocks[1].register_forward_hook(lambda *a: ran.append("up_blocks.1"))
    ext.denoiser.conv_out.register_forward_hook(lambda *a: ran.append("conv_out"))
    ext(images(1)[0])
    assert ran == []  # listed out of order: it stops after up_blocks.0, the later of the two in the forward
    ext.blocks = ["up_blocks.1"]
    ext(images(1)[0])
    assert ran == ["up_blocks.1"]  # conv_out, after it, still does not run


@pytest.mark.parametrize("family", ["sd", "dit"])
def test_batch_equals_single_images(pipelines, family):
    ext = extractor(pipelines[family], blocks=BLOCKS[family])
    batch = images(3, seed=1)
    maps = ext(batch)
    for i in range(3):
        for m, single in zip(maps, ext(batch[i])):
            torch.testing.assert_close(m[i], single, rtol=1e-4, atol=1e-5)


def test_random_init_and_bfloat16(pipelines):
    image = images(1)[0]
    trained = extractor(pipelines["sd"], blocks=["up_blocks.1"])(image)[0]
    cfg = config(pipelines["sd"], blocks=["up_blocks.1"])
    random = [create_feature_extractor(validate_experiment(cfg), {}, torch.device("cpu"), seed=3, random_init=True)(image)[0]
              for _ in range(2)]
    assert torch.equal(random[0], random[1]) and not torch.allclose(random[0], trained)  # seeded, and not the weights
    half = extractor(pipelines["sd"], blocks=["up_blocks.1"], dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    maps = half(image)[0]
    assert maps.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(maps.flatten(), trained.flatten(), dim=0) > 0.99


def test_bad_module_name_lists_close_names(pipelines):
    with pytest.raises(ValueError, match=r"no module 'up_blocks\.1\.attention\.0'.*close names: .*up_blocks\.1\.attentions\.0"):
        extractor(pipelines["sd"], blocks=["up_blocks.1.attention.0"])
    with pytest.raises(ValueError, match=r"attn2\.to_k.*not image tokens"):
        extractor(pipelines["sd"], blocks=["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"])(images(1)[0])


def test_model_path_neither_folder_nor_cached_fails_at_once_offline(tmp_path):
    # A fresh process with an empty cache and the hub marked offline: one line, exit 2, no network wait.
    cfg_path = tmp_path / "exp.json"
    write_splits(tmp_path / "data", {"train": 1, "test": 1}, size=SIZE, bar=4)
    cfg = config("nobody/no-such-pipeline", training_path=str(tmp_path / "data/train"),
                 testing_path=str(tmp_path / "data/test"), training_number=1, testing_number=1)
    cfg_path.write_text(json.dumps(cfg))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=os.getcwd())
    run = subprocess.run([sys.executable, "-c", "import sys; from ddpm_seg.cli import entry; sys.exit(entry())",
                          "train-interpreter", "--exp", str(cfg_path), "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "'nobody/no-such-pipeline' is not a folder, not in the Hugging Face cache" in lines[0]
    assert "not reachable (offline)" in lines[0]
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub model id"):
        extractor(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        extractor(str(tmp_path))


def test_missing_extra_names_the_install_command(pipelines, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ValueError, match=r"pip install -e '\.\[diffusers\]'"):
        extractor(pipelines["sd"])


def test_config_takes_module_names_for_diffusers_only():
    cfg = config("m", blocks=["up_blocks.2", "up_blocks.1"], prompt="a photo", noise_draws=2, dtype="bfloat16")
    assert validate_experiment(dict(cfg)).blocks == ["up_blocks.2", "up_blocks.1"]  # order as given
    with pytest.raises(ValueError, match=r"lists \['up_blocks.1'\] more than once"):
        validate_experiment(config("m", blocks=["up_blocks.1", "up_blocks.1"]))
    with pytest.raises(ValueError, match="must be module names"):
        validate_experiment(config("m", blocks=[5]))
    with pytest.raises(ValueError, match="'dtype' must be one of"):
        validate_experiment(config("m", dtype="fp8"))
    with pytest.raises(ValueError, match="list of integers"):
        validate_experiment(config("m", model_type="ddpm", blocks=["up_blocks.1"]))
    with pytest.raises(ValueError, match=r"'prompt' applies only to model_type \['diffusers'\], not 'ddpm'"):
        validate_experiment(config("m", model_type="ddpm", blocks=[1], prompt="x"))
    # Long module names keep the run folder name short and distinct.
    long_names = BLOCKS["sd"] + ["mid_block"]
    suffix = experiment_suffix(validate_experiment(config("m", blocks=long_names)))
    assert len(suffix) < 130 and suffix.startswith("10_60_blocks-")
    assert suffix != experiment_suffix(validate_experiment(config("m", blocks=long_names[:-1])))


def test_sd15_configs_give_the_features_their_dim_says():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    blocks = ARCHS["sd15"][3]
    # The real SD-1.5 UNet and VAE architecture run on the meta device: exact shapes, no compute.
    shapes, _ = feature_shapes("sd15", [50, 150], blocks, 512)
    assert shapes[:5] == [(1280, 16, 16), (1280, 32, 32), (640, 32, 32), (640, 32, 32), (640, 64, 64)]
    for dataset in ("bedroom_28", "ffhq_34", "cat_15", "horse_21", "celeba_19", "ade_bedroom_30"):
        sd15 = load_experiment(os.path.join(root, "experiments", dataset, "sd15.json"))
        ddpm = load_experiment(os.path.join(root, "experiments", dataset, "ddpm.json"))
        assert sd15.steps == [50, 150] and sd15.blocks == blocks
        assert sd15.dim == [512, 512, sum(s[0] for s in shapes)] == [512, 512, 8960]
        same = ("category", "number_class", "ignore_label", "training_path", "testing_path", "training_number",
                "testing_number", "model_num", "batch_size")
        assert {k: getattr(sd15, k) for k in same} == {k: getattr(ddpm, k) for k in same}


def test_load_components_skips_parts_features_do_not_need(pipelines):
    parts = load_components(pipelines["sd"], torch.float32)
    assert sorted(parts) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    # The training noise process with the pipeline's own betas, whatever sampler the pipeline ships.
    assert isinstance(parts["scheduler"], diffusers.DDPMScheduler)
    assert parts["scheduler"].config.beta_schedule == "scaled_linear" and parts["scheduler"].config.num_train_timesteps == 100


@pytest.fixture
def sd_experiment(pipelines, tmp_path):
    """A tiny SD-like experiment on generated labelled images, the way a user writes one."""
    write_splits(tmp_path / "data", {"train": 4, "test": 3}, size=SIZE, bar=4)
    cfg = config(pipelines["sd"], exp_dir=str(tmp_path / "runs"), training_path=str(tmp_path / "data/train"),
                 testing_path=str(tmp_path / "data/test"), blocks=["up_blocks.0", "up_blocks.1.attentions.0"],
                 dim=[SIZE, SIZE, 2 * (32 + 16)], prompt="a picture")
    path = tmp_path / "sd.json"
    path.write_text(json.dumps(cfg))
    return path, cfg


def test_train_interpreter_end_to_end(sd_experiment):
    path, cfg = sd_experiment
    cli_main(["train-interpreter", "--exp", str(path), "--device", "cpu", "--no_pictures"])
    folder = os.path.join(cfg["exp_dir"], "10_60_up_blocks.0_up_blocks.1.attentions.0", "seed_0")
    metrics = json.load(open(os.path.join(folder, "metrics.json")))
    assert sorted(os.listdir(folder)) == sorted(["metrics.json", "model_0.pth", "model_1.pth", "model_flags.json",
                                                 "predictions", "sd.json", "settings.json"])
    assert metrics["model_type"] == "diffusers" and metrics["num_test_images"] == 3
    # Square, bar and background are told apart far better than chance (1/3 per class).
    assert metrics["miou"] > 0.5
    # predict with the run folder segments the test images exactly as the evaluation did.
    out = os.path.join(os.path.dirname(str(path)), "predicted")
    assert cli_main(["predict", "--run_dir", folder, "--input", cfg["testing_path"], "--out", out,
                     "--device", "cpu", "--format", "npy", "--no_overlay"]) == 0
    evaluated = sorted(os.listdir(os.path.join(folder, "predictions")))
    assert len(evaluated) == 3
    for name in evaluated:
        assert np.array_equal(np.load(os.path.join(out, "masks", name)),
                              np.load(os.path.join(folder, "predictions", name)))


def test_sweep_over_module_names(sd_experiment, tmp_path):
    path, cfg = sd_experiment
    out = tmp_path / "sweep"
    cli_main(["sweep", "--exp", str(path), "--device", "cpu", "--steps", "10,60",
              "--blocks", "up_blocks.0,up_blocks.1.attentions.0", "--out", str(out)])
    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0] == "step,block,channels,resolution,miou"
    assert [r.rsplit(",", 1)[0] for r in rows[1:]] == [
        "10,up_blocks.0,32,16x16", "10,up_blocks.1.attentions.0,16,16x16",
        "60,up_blocks.0,32,16x16", "60,up_blocks.1.attentions.0,16,16x16"]
    # A cell equals train-interpreter on that one step and module, as for the DDPM.
    single = dict(cfg, steps=[60], blocks=["up_blocks.1.attentions.0"], dim=[SIZE, SIZE, 16], model_num=1)
    single_path = tmp_path / "single.json"
    single_path.write_text(json.dumps(single))
    cli_main(["train-interpreter", "--exp", str(single_path), "--device", "cpu", "--no_pictures"])
    metrics = json.load(open(os.path.join(cfg["exp_dir"], "60_up_blocks.1.attentions.0", "seed_0", "metrics.json")))
    assert float(rows[4].rsplit(",", 1)[1]) == metrics["miou"]


@pytest.mark.parametrize("damage", ["no_weights", "broken_config", "broken_index", "unknown_class"])
def test_a_broken_pipeline_folder_is_one_line_naming_the_part(pipelines, tmp_path, damage):
    folder = tmp_path / "pipe"
    shutil.copytree(pipelines["sd"], folder)
    if damage == "no_weights":
        for weights in (folder / "unet").glob("diffusion_pytorch_model*"):
            weights.unlink()
        expected = r"pipe/unet: cannot load the pipeline's unet \(UNet2DConditionModel\)"
    elif damage == "broken_config":
        (folder / "unet" / "config.json").write_text('{"sample_size": 8,')
        expected = r"pipe/unet: cannot load the pipeline's unet"
    elif damage == "broken_index":
        (folder / "model_index.json").write_text("{not json")
        expected = r"pipe/model_index.json"
    else:
        index = json.loads((folder / "model_index.json").read_text())
        index["unet"] = ["diffusers", "NoSuchModel"]
        (folder / "model_index.json").write_text(json.dumps(index))
        expected = r"pipe/unet: cannot load the pipeline's unet \(NoSuchModel\)"
    exp = tmp_path / "exp.json"
    exp.write_text(json.dumps(config(str(folder), training_path=str(tmp_path), testing_path=str(tmp_path))))
    run = subprocess.run([sys.executable, "-c", "import sys; from ddpm_seg.cli import entry; sys.exit(entry())",
                          "train-interpreter", "--exp", str(exp), "--device", "cpu"], capture_output=True, text=True)
    # diffusers logs its own warnings first; ours is one line, the last.
    errors = [line for line in run.stderr.splitlines() if line.startswith("ddpm-seg train-interpreter: error:")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    assert re.search(expected, errors[0]) and run.stderr.strip().endswith(errors[0]), errors[0]
