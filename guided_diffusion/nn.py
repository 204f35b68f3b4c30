"""Small neural-network helpers shared by the UNet and the diffusion code."""
import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always normalises in float32, so fp16 activations keep accurate statistics."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    # Every norm in ADM uses 32 groups; the checkpoints depend on it.
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-, 2- or 3-D convolution (attention uses 1-D 1x1 convs over flattened positions)."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return convs[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return pools[dims](*args, **kwargs)


def linear(*args, **kwargs) -> nn.Module:
    return nn.Linear(*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches then start as the identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the batch one."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps: cosines first, then sines."""
    half = dim // 2
    # Frequencies are computed in float32 on the CPU and then moved, as the official code does, so
    # CUDA runs get bit-identical embeddings (a device exp may round the last bit differently).
    exponent = torch.arange(half, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponent).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(func, inputs, enabled: bool):
    """Run func(*inputs), recomputing activations in backward instead of storing them when enabled.

    Skipped when autograd is off: there is nothing to save memory on then.
    """
    if enabled and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def convert_module_to_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast a convolution's weights to `dtype` (other layers stay float32, as in ADM's fp16 mode)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
