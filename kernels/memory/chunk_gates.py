"""Gate algebra of a chunk: products of the retention and momentum gates from log-space segment
sums, and the banded Omega window matrix (DESIGN section 2, the chunked dual form).

Products of gates are built from log-space segment sums (no subtraction of running sums), in the
compute dtype, which is at least fp32. Leading dimensions are free: one chunk [B, H, L] or every
chunk at once [NC, B*H, L].
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


def segment_products(log_x: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L] with out[t, m] = prod_{m < r <= t} x_r for t >= m, else 0.

    Built transposed, out^T[m, t], so that the running sum over t runs along contiguous memory
    (several times faster than along rows); the result is a transposed view.
    """
    length = log_x.shape[-1]
    later = torch.ones(length, length, dtype=torch.bool, device=log_x.device).triu(1)   # t > m
    sums = log_x.unsqueeze(-2).expand(*log_x.shape[:-1], length, length).masked_fill(~later, 0.0)
    sums = sums.cumsum(dim=-1)
    return sums.exp().masked_fill(~later.logical_or(torch.eye(length, dtype=torch.bool,
                                                             device=log_x.device)), 0.0).mT


class ChunkCoefficients(NamedTuple):
    retain: torch.Tensor            # A_t = prod_{r<=t} alpha_r            [B, H, L]
    retain_pairs: torch.Tensor      # L_A                                  [B, H, L, L]
    momentum_carry: Optional[torch.Tensor]  # P_t = prod_{r<=t} theta_r   [B, H, L] (None: no momentum)
    momentum_pairs: torch.Tensor    # L_P (identity without momentum)      [B, H, L, L]
    window: torch.Tensor            # Gamma                                [B, H, L, L+c-1]


def chunk_coefficients(alpha: torch.Tensor, theta: Optional[torch.Tensor], g_window: torch.Tensor,
                       window: int) -> ChunkCoefficients:
    """Gate algebra of one chunk: alpha, theta [B, H, L]; g_window [B, H, L+c-1] (window coordinates)."""
    length = alpha.shape[-1]
    log_alpha = alpha.log()
    if theta is None:
        carry = None
        pairs = torch.eye(length, dtype=alpha.dtype, device=alpha.device).expand(*alpha.shape, length)
    else:
        log_theta = theta.log()
        carry = log_theta.cumsum(-1).exp()
        pairs = segment_products(log_theta)
    # Gamma[t, j] = g_j for the window tokens j = t .. t+c-1 (window coordinates) of token t
    rows = torch.arange(length, device=alpha.device)[:, None]
    cols = torch.arange(length + window - 1, device=alpha.device)[None, :]
    band = (cols >= rows) & (cols < rows + window)
    return ChunkCoefficients(log_alpha.cumsum(-1).exp(), segment_products(log_alpha), carry, pairs,
                             band.to(g_window.dtype) * g_window.unsqueeze(-2))
