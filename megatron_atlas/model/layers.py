"""Small building blocks: RMSNorm, SwiGLU feed-forward, causal depthwise short convolution."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension, or over groups of it (per head) when `groups` > 1."""

    def __init__(self, dim: int, eps: float = 1e-6, groups: int = 1):
        super().__init__()
        if dim % groups:
            raise ValueError(f"RMSNorm dim={dim} is not divisible by groups={groups}")
        self.eps, self.groups = eps, groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        grouped = x.float().reshape(*shape[:-1], self.groups, shape[-1] // self.groups)
        normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.reshape(shape).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """Feed-forward `W_down (silu(W_gate x) * W_up x)`."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ShortConv(nn.Module):
    """Causal depthwise conv over time; `cache` holds the last width-1 inputs for decoding."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        nn.init.normal_(self.weight, std=width ** -0.5)
        with torch.no_grad():  # start close to the identity so the memory sees its tokens
            self.weight[:, 0, -1] += 1.0

    def forward(self, x: Tensor, cache: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """x [B, T, C] -> y [B, T, C] and the new cache [B, width-1, C]."""
        if cache is None:
            cache = x.new_zeros(x.shape[0], self.width - 1, x.shape[2])
        padded = torch.cat([cache, x], dim=1)
        y = F.conv1d(padded.transpose(1, 2), self.weight.to(x.dtype), groups=x.shape[2]).transpose(1, 2)
        return y, padded[:, padded.shape[1] - (self.width - 1):]
