"""Rotary position embedding (RoPE) in the half-rotation ("rotate_half", Llama/NeoX) layout.

Channel i of the first half is paired with channel i + D/2 of the second half and the pair is
rotated by angle `position * theta ** (-2i / D)`, so the dot product of a rotated query and key
depends only on the difference of their positions.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape [T, head_dim] for integer `positions` [T].

    The angles are formed in float64: at long-context positions (1e6 and beyond) a float32 product
    `position * inv_freq` loses several digits of the angle. The tables are tiny ([T, D]), so this
    costs nothing measurable; they are then cast to `dtype` (float32, or float64 for float64 inputs).
    """
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for RoPE")
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim
    inv_freq = float(theta) ** -exponent                                   # [D/2]
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]      # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)                           # [T, D] (rotate_half layout)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotate `x` [B, T, H, D] by its absolute integer `positions` [T]; returns x's dtype.

    Positions are absolute so that incremental decoding can pass `offset + arange(T)`.
    The rotation itself runs in float32 (float64 for float64 inputs) for accuracy in bf16 training.
    """
    if positions.dim() != 1 or positions.shape[0] != x.shape[1]:
        raise ValueError(f"positions must have shape [T={x.shape[1]}], got {tuple(positions.shape)}")
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, compute_dtype)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]               # broadcast over B and H
    xf = x.to(compute_dtype)
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
