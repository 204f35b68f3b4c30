"""UNetModel: official checkpoint layout, activations' shapes, fp16 handling and building blocks."""
import argparse
import math
import os
import shlex

import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.nn import GroupNorm32, timestep_embedding
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    str2bool,
)
from guided_diffusion.unet import QKVAttention, QKVAttentionLegacy, UNetModel

# The paper's MODEL_FLAGS for the LSUN / FFHQ 256x256 checkpoints, verbatim.
PAPER_FLAGS = (
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)


def parse_flags(flags):
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, model_and_diffusion_defaults())
    args = parser.parse_args(shlex.split(flags))
    return args_to_dict(args, model_and_diffusion_defaults().keys())


def paper_model_on_meta():
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**parse_flags(PAPER_FLAGS))
    return model


def tiny_model(seed=0, **overrides):
    """A ~2M-parameter model with random (not zero-initialised) weights so every path affects the output."""
    kwargs = dict(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        attention_resolutions="16,8",
        num_head_channels=16,
        learn_sigma=True,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = create_model(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_inputs(batch=2):
    gen = torch.Generator().manual_seed(123)
    return torch.randn(batch, 3, 32, 32, generator=gen), torch.tensor([3, 700][:batch])


def test_paper_flags_parse_through_argparse():
    opts = parse_flags(PAPER_FLAGS)
    assert opts["attention_resolutions"] == "32,16,8"
    assert opts["class_cond"] is False and opts["learn_sigma"] is True and opts["use_fp16"] is True
    assert opts["dropout"] == pytest.approx(0.1) and isinstance(opts["dropout"], float)
    assert opts["num_channels"] == 256 and opts["num_head_channels"] == 64 and opts["image_size"] == 256
    with torch.device("meta"):
        model, diffusion = create_model_and_diffusion(**opts)
    assert model.attention_resolutions == (8, 16, 32)  # resolutions 32,16,8 as downsample rates of 256
    assert model.channel_mult == (1, 1, 2, 2, 4, 4)
    assert model.out_channels == 6 and model.num_classes is None
    assert diffusion.num_timesteps == 1000
    assert diffusion.model_var_type == gd.ModelVarType.LEARNED_RANGE
    assert diffusion.model_mean_type == gd.ModelMeanType.EPSILON


def test_str2bool():
    assert str2bool("True") and str2bool("1") and str2bool("yes")
    assert not str2bool("False") and not str2bool("0") and not str2bool("n")
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")


def test_paper_state_dict_matches_official_listing(reference_dir):
    path = os.path.join(reference_dir, "guided_diffusion_lsun256_state_dict.txt")
    with open(path) as f:
        header, *expected = f.read().splitlines()
    model = paper_model_on_meta()
    state = model.state_dict()
    ours = [f"{key}\t{','.join(map(str, value.shape))}" for key, value in state.items()]
    assert ours == expected
    total = sum(value.numel() for value in state.values())
    assert f"total parameters (sum of numel over all state_dict entries): {total}" in header
    assert total == 552814086


def test_paper_output_block_activations():
    """Shapes of the decoder activations the paper's pixel classifiers read, for a 256x256 input.

    The full 552M model is run on the meta device: every op propagates shapes only, so this is the
    real module graph at the real width, without the CPU cost of a 256^2 forward.
    """
    model = paper_model_on_meta()
    shapes = {}
    hooks = [
        block.register_forward_hook(lambda _m, _in, out, i=i: shapes.__setitem__(i, tuple(out.shape)))
        for i, block in enumerate(model.output_blocks)
    ]
    with torch.device("meta"):
        out = model(torch.zeros(1, 3, 256, 256), torch.tensor([50]))
    for hook in hooks:
        hook.remove()
    assert out.shape == (1, 6, 256, 256)
    assert len(shapes) == 18
    expected = {5: (1024, 32), 6: (512, 32), 7: (512, 32), 8: (512, 64), 12: (256, 128)}
    for block, (channels, res) in expected.items():
        assert shapes[block] == (1, channels, res, res), block
    assert sum(shapes[b][1] for b in expected) == 2816


def test_small_model_state_dict_round_trip(tmp_path):
    model = tiny_model(seed=0)
    x, t = tiny_inputs()
    with torch.no_grad():
        expected = model(x, t)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)

    fresh = tiny_model(seed=1)
    with torch.no_grad():
        assert not torch.allclose(fresh(x, t), expected)
    fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x, t), expected)
    assert expected.shape == (2, 6, 32, 32)


def test_use_fp16_flag_alone_keeps_cpu_model_float32():
    reference = tiny_model(seed=0)
    flagged = tiny_model(seed=0, use_fp16=True)
    assert flagged.use_fp16 and flagged.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in flagged.parameters())
    x, t = tiny_inputs()
    with torch.no_grad():
        out = flagged(x, t)
        assert out.dtype == torch.float32
        assert torch.equal(out, reference(x, t))


def test_convert_to_fp16_and_back():
    model = tiny_model(seed=0, use_fp16=True)
    x, t = tiny_inputs()
    with torch.no_grad():
        full = model(x, t)
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    body_convs = [m for m in model.output_blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert body_convs and all(m.weight.dtype == torch.float16 for m in body_convs)
    assert model.middle_block[1].qkv.weight.dtype == torch.float16  # 1-D attention convs too
    # Norms, embeddings and the output head stay float32, as in the official fp16 mode.
    assert model.middle_block[0].in_layers[0].weight.dtype == torch.float32
    assert model.middle_block[0].emb_layers[1].weight.dtype == torch.float32
    assert model.time_embed[0].weight.dtype == torch.float32
    assert model.out[2].weight.dtype == torch.float32
    with torch.no_grad():
        half = model(x, t)
    assert half.dtype == torch.float32
    assert torch.allclose(half, full, atol=0.05) and not torch.equal(half, full)

    model.convert_to_fp32()
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_gradient_checkpointing_matches_plain():
    plain = tiny_model(seed=0).train()
    ckpt = tiny_model(seed=0, use_checkpoint=True).train()
    x, t = tiny_inputs()
    outs, calls = [], []
    for model in (plain, ckpt):
        count = [0]
        model.middle_block[0].in_layers.register_forward_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        out = model(x, t)
        out.square().mean().backward()
        outs.append(out.detach())
        calls.append(count[0])
    # Checkpointed blocks run their forward again during backward instead of keeping activations.
    assert calls == [1, 2]
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


def test_class_conditional_model_uses_labels():
    model = tiny_model(seed=0, class_cond=True)
    assert model.label_emb.weight.shape == (1000, 128)
    x, t = tiny_inputs()
    with torch.no_grad():
        a = model(x, t, y=torch.tensor([1, 2]))
        b = model(x, t, y=torch.tensor([3, 4]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)


def test_plain_resampling_layers_use_official_names():
    """Without resblock_updown, Downsample/Upsample convs are named ...op / ...conv as in the checkpoints."""
    model = tiny_model(seed=0, resblock_updown=False, channel_mult="1,2", attention_resolutions="16")
    keys = model.state_dict().keys()
    assert "input_blocks.2.0.op.weight" in keys
    # Last decoder block of the lower level: ResBlock, attention (res 16), then the upsampler.
    assert "output_blocks.1.2.conv.weight" in keys
    x, t = tiny_inputs()
    with torch.no_grad():
        assert model(x, t).shape == (2, 6, 32, 32)


def test_default_channel_mult_by_image_size():
    assert create_model(32, 32, 1, attention_resolutions="16").channel_mult == (1, 2, 2, 2)
    assert create_model(16, 32, 1, attention_resolutions="8").channel_mult == (1, 2, 2)
    with torch.device("meta"):
        assert create_model(64, 32, 1).channel_mult == (1, 2, 3, 4)
        assert create_model(256, 32, 1, channel_mult="1,1,2,2,4,4").channel_mult == (1, 1, 2, 2, 4, 4)
        half = create_model(64, 64, 1, channel_mult="0.5,1")
    assert half.channel_mult == (0.5, 1) and half.input_blocks[0][0].out_channels == 32
    with pytest.raises(ValueError, match="channel_mult"):
        create_model(48, 32, 1, attention_resolutions="12")
    with pytest.raises(ValueError, match="attention resolution"):
        create_model(32, 32, 1, attention_resolutions="5")


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 7.0, 999.5])
    emb = timestep_embedding(t, 9)  # odd width: one zero pad column
    assert emb.shape == (3, 9)
    freqs = torch.tensor([math.exp(-math.log(10000) * i / 4) for i in range(4)])
    args = t[:, None] * freqs[None]
    assert torch.allclose(emb[:, :4], torch.cos(args), atol=1e-5)
    assert torch.allclose(emb[:, 4:8], torch.sin(args), atol=1e-5)
    assert torch.equal(emb[:, 8], torch.zeros(3))


def test_groupnorm32_computes_in_float32():
    norm = GroupNorm32(32, 64)
    x = (torch.randn(2, 64, 4, 4) * 300 + 1000).half()
    out = norm(x)
    assert out.dtype == torch.float16
    expected = torch.nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).half()
    assert torch.equal(out, expected)


def test_attention_orders():
    torch.manual_seed(0)
    bs, heads, ch, length = 2, 3, 4, 5
    qkv = torch.randn(bs, 3 * heads * ch, length)
    legacy = QKVAttentionLegacy(heads)(qkv)

    # Reference: per head, softmax(q^T k / sqrt(ch)) applied to v, legacy layout [head][q|k|v][ch].
    per_head = qkv.reshape(bs, heads, 3, ch, length)
    q, k, v = per_head[:, :, 0], per_head[:, :, 1], per_head[:, :, 2]
    weights = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(ch), dim=-1)
    expected = torch.einsum("bhts,bhcs->bhct", weights, v).reshape(bs, heads * ch, length)
    assert torch.allclose(legacy, expected, atol=1e-5)

    # The new order reads the same numbers laid out [q|k|v][head][ch].
    new_layout = per_head.transpose(1, 2).reshape(bs, 3 * heads * ch, length)
    assert torch.allclose(QKVAttention(heads)(new_layout), legacy, atol=1e-6)
    assert not torch.allclose(QKVAttention(heads)(qkv), legacy, atol=1e-3)


def test_new_attention_order_model_runs():
    model = tiny_model(seed=0, use_new_attention_order=True)
    x, t = tiny_inputs()
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == (2, 6, 32, 32) and torch.isfinite(out).all()
    assert isinstance(model.middle_block[1].attention, QKVAttention)


def test_head_channels_must_divide_width():
    with pytest.raises(ValueError, match="num_head_channels"):
        UNetModel(32, 3, 32, 3, 1, (1,), num_head_channels=24, channel_mult=(1,))
