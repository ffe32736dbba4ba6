"""Small building blocks: RMSNorm, SwiGLU feed-forward, causal depthwise short convolution.

Under tensor parallelism SwiGLU is column- then row-parallel, and ShortConv (depthwise, so channels
are independent) keeps this rank's channels; see megatron_atlas.parallel.layers.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_atlas.model.causal_conv import causal_depthwise_conv
from megatron_atlas.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_atlas.parallel.sharding import divide, mark_tensor_parallel, tp_size_of
from megatron_atlas.parallel.state import ParallelState


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension, or over groups of it (per head) when `groups` > 1.

    Groups have a fixed width dim / groups, so a tensor-parallel shard holding whole groups
    (whole heads) normalises the same way."""

    def __init__(self, dim: int, eps: float = 1e-6, groups: int = 1):
        super().__init__()
        if dim % groups:
            raise ValueError(f"RMSNorm dim={dim} is not divisible by groups={groups}")
        self.eps, self.group_width = eps, dim // groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        grouped = x.float().reshape(*shape[:-1], shape[-1] // self.group_width, self.group_width)
        normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.reshape(shape).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """Feed-forward `W_down (silu(W_gate x) * W_up x)`.

    `gate_up` rows are interleaved per hidden unit (gate_0, up_0, gate_1, up_1, ...), so a contiguous
    slice of rows is a set of whole hidden units: the column-parallel split needs no re-layout.
    """

    def __init__(self, d_model: int, hidden: int, parallel: ParallelState | None = None):
        super().__init__()
        divide(hidden, tp_size_of(parallel), "model.ffn_hidden")
        self.gate_up = ColumnParallelLinear(d_model, 2 * hidden, parallel=parallel, what="2 * model.ffn_hidden")
        self.down = RowParallelLinear(hidden, d_model, parallel=parallel, what="model.ffn_hidden")

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).unflatten(-1, (-1, 2)).unbind(-1)
        return self.down(F.silu(gate) * up)


class ShortConv(nn.Module):
    """Causal depthwise conv over time; `cache` holds the last width-1 inputs for decoding."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        # depthwise: channels are independent, so tensor parallelism keeps a contiguous range
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(channels, 1, width)), 0)
        nn.init.normal_(self.weight, std=width ** -0.5)
        with torch.no_grad():  # start close to the identity so the memory sees its tokens
            self.weight[:, 0, -1] += 1.0

    def forward(self, x: Tensor, cache: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """x [B, T, C] -> y [B, T, C] and the new cache [B, width-1, C]."""
        if cache is None:
            cache = x.new_zeros(x.shape[0], self.width - 1, x.shape[2])
        taps = self.weight[:, 0].t().to(x.dtype).contiguous()
        y = causal_depthwise_conv(x, cache, taps)
        keep = self.width - 1
        new_cache = x[:, x.shape[1] - keep:] if x.shape[1] >= keep else torch.cat([cache, x], dim=1)[:, -keep:]
        return y, new_cache
