"""The ADM UNet (Dhariwal & Nichol, 2021), laid out so OpenAI's guided-diffusion checkpoints load unchanged.

Module names, registration order and the arithmetic of every layer follow the official model, because
the state_dict keys and the activations fed to the segmentation heads must match it exactly.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    convert_module_to_dtype,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x, emb):
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """nn.Sequential that hands the timestep embedding to the children that want it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv.

    For dims=3 only the inner two (spatial) dimensions are upsampled.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError(f"Upsample without conv cannot change channels ({channels} -> {self.out_channels})")

    def forward(self, x):
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv, or by average pooling when use_conv is False.

    For dims=3 only the inner two (spatial) dimensions are downsampled.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        elif self.out_channels != channels:
            raise ValueError(f"Downsample without conv cannot change channels ({channels} -> {self.out_channels})")
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding; may change channels or resample.

    :param use_conv: when channels change, use a 3x3 conv (not a 1x1) on the skip path.
    :param use_scale_shift_norm: condition as norm(h) * (1 + scale) + shift (FiLM) instead of adding emb.
    :param up/down: resample both paths in the middle of the block (BigGAN-style, "resblock_updown").
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            # Resample after norm+activation but before the conv, on both the branch and the skip.
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)

        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _attend(q, k, v):
    """Softmax attention over [B*heads, ch, T] tensors; returns [B*heads, ch, T]."""
    ch = q.shape[1]
    # Scaling q and k by ch^-1/4 each (rather than the logits by ch^-1/2) is kinder to fp16.
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


class QKVAttentionLegacy(nn.Module):
    """QKV attention whose input channels are laid out head-major: [heads x (q, k, v) x ch]."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, 3 * ch, length).split(ch, dim=1)
        return _attend(q, k, v).reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """QKV attention whose input channels are laid out qkv-major: [(q, k, v) x heads x ch]."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (part.reshape(bs * self.n_heads, ch, length) for part in qkv.chunk(3, dim=1))
        return _attend(q, k, v).reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, added residually.

    :param num_head_channels: if not -1, the channels per head (overrides num_heads).
    :param use_new_attention_order: split q/k/v before heads (QKVAttention) instead of the legacy order.
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        elif channels % num_head_channels:
            raise ValueError(
                f"attention channels {channels} are not divisible by num_head_channels {num_head_channels}"
            )
        else:
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads {self.num_heads}")
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        attention_cls = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attention_cls(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.use_checkpoint)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The ADM UNet with attention and timestep (and optional class) conditioning.

    :param image_size: nominal input size (kept for reference; any size divisible by 2**(levels-1) works).
    :param in_channels / out_channels: image channels in and out (out is 2x image channels with learned sigma).
    :param model_channels: base width; level i has int(channel_mult[i] * model_channels) channels.
    :param num_res_blocks: residual blocks per level on the way down (one more per level on the way up).
    :param attention_resolutions: downsample rates (1, 2, 4, ...) at which attention blocks are added.
    :param conv_resample: use convs (not pooling / plain nearest) for the resampling layers.
    :param dims: 1, 2 or 3-D signals.
    :param num_classes: if an int, the model is class-conditional and forward needs y.
    :param use_checkpoint: gradient checkpointing in every residual and attention block.
    :param use_fp16: records that the checkpoint was run in fp16. It converts nothing: call
        convert_to_fp16() for that (so a CPU model built with the flag stays float32).
    :param num_heads / num_head_channels / num_heads_upsample: attention head layout
        (num_head_channels != -1 wins; num_heads_upsample=-1 means num_heads).
    :param use_scale_shift_norm: FiLM-like conditioning in the residual blocks.
    :param resblock_updown: resample with residual blocks instead of Downsample/Upsample layers.
    :param use_new_attention_order: q/k/v-major attention layout instead of the legacy head-major one.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        emb_dim = model_channels * 4

        def res_block(ch_in, ch_out, **kwargs):
            return ResBlock(
                ch_in,
                emb_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kwargs,
            )

        def attention(ch, heads):
            return AttentionBlock(
                ch,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
            )

        self.time_embed = nn.Sequential(
            linear(model_channels, emb_dim),
            nn.SiLU(),
            linear(emb_dim, emb_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        ch = first_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
        )
        # Widths of every encoder output, consumed in reverse by the decoder's skip connections.
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    res_block(ch, ch, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            attention(ch, num_heads),
            res_block(ch, ch),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(
                        res_block(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, first_ch, out_channels, 3, padding=1)),
        )

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the body (input/middle/output blocks): float32 unless convert_body() set another."""
        return self.input_blocks[0][0].weight.dtype

    def _body(self):
        return (self.input_blocks, self.middle_block, self.output_blocks)

    def convert_body(self, dtype: torch.dtype):
        """Cast the body's convolutions to `dtype` (float16 as ADM's fp16 mode, bfloat16, or float32 to undo
        it); norms (which compute in float32 anyway), embeddings and the output head stay float32."""
        for part in self._body():
            part.apply(lambda module: convert_module_to_dtype(module, dtype))

    def convert_to_fp16(self):
        self.convert_body(torch.float16)

    def convert_to_fp32(self):
        self.convert_body(torch.float32)

    def forward(self, x, timesteps, y=None):
        """
        :param x: [N, C, ...] inputs.
        :param timesteps: [N] timesteps (integer or float, not rescaled here).
        :param y: [N] class labels; required iff the model is class-conditional.
        :return: [N, out_channels, ...] outputs in x's dtype.
        """
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                "y (class labels) must be given if and only if the model is class-conditional "
                f"(num_classes={self.num_classes}, y given: {y is not None})"
            )
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        h = x.type(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))
