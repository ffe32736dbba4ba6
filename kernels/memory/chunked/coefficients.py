"""Gate algebra of the chunked dual form, in one place and one sign convention (docs/design.md).

Inside a chunk every inner gradient is taken at the chunk-start state (W_s, S_s), and the momentum
and retention recurrences are linear scalar scans, so under the `gd` rule

    S_t = P_t S_s + sum_j MS[t, j] delta_j x_j^T,     W_t = A_t W_s - F_t S_s - sum_j MW[t, j] delta_j x_j^T

with A_t = prod_{r<=t} alpha_r, P_t = prod_{r<=t} theta_r, L_A[t, m] = prod_{m<r<=t} alpha_r (L_P the
same for theta), Gamma the banded b x (b+c-1) Omega window matrix of the gates g,
MS = (L_P diag(eta)) Gamma, MW = L_A MS ("mixing") and F = L_A P ("carry"). Every path reads these
from `gd_coefficients` (the chunked Function, the autograd chunk loop, the Triton launchers); the
`muon` rule reads the products themselves from `chunk_coefficients`.

Products of gates come from log-space segment sums (no subtraction of running sums) in the compute
dtype (at least fp32). Products of many gates below 1 fall towards zero and, on the way, into the
subnormal range, where x86 arithmetic is many times slower; a coefficient that small carries no
information next to the O(1) terms it is summed with, so coefficients below
`kernels.precision.flush_threshold` = sqrt(smallest normal) are built as exact zeros.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from kernels.precision import exp_flushed, flush_tiny


def segment_products(log_x: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L] with out[t, m] = prod_{m < r <= t} x_r for t >= m, else 0.

    Built transposed, out^T[m, t], so that the running sum over t runs along contiguous memory
    (several times faster than along rows); the result is a transposed view.
    """
    length = log_x.shape[-1]
    later = torch.ones(length, length, dtype=torch.bool, device=log_x.device).triu(1)   # t > m
    sums = log_x.unsqueeze(-2).expand(*log_x.shape[:-1], length, length).masked_fill(~later, 0.0)
    sums = sums.cumsum(dim=-1)
    keep = later.logical_or(torch.eye(length, dtype=torch.bool, device=log_x.device))
    return exp_flushed(sums.masked_fill(~keep, -math.inf)).mT


class ChunkCoefficients(NamedTuple):
    retain: torch.Tensor            # A_t = prod_{r<=t} alpha_r            [.., L]
    retain_pairs: torch.Tensor      # L_A                                  [.., L, L]
    momentum_carry: Optional[torch.Tensor]  # P_t = prod_{r<=t} theta_r   [.., L] (None: no momentum)
    momentum_pairs: torch.Tensor    # L_P (identity without momentum)      [.., L, L]
    window: torch.Tensor            # Gamma                                [.., L, L+c-1]


def chunk_coefficients(alpha: torch.Tensor, theta: Optional[torch.Tensor], g_window: torch.Tensor,
                       window: int) -> ChunkCoefficients:
    """Gate products of chunks: alpha, theta [.., L]; g_window [.., L+c-1] (window coordinates).
    Leading dimensions are free: one chunk [B, H, L] or every chunk at once [B, H, NC, L]."""
    length = alpha.shape[-1]
    log_alpha = alpha.log()
    if theta is None:
        carry = None
        pairs = torch.eye(length, dtype=alpha.dtype, device=alpha.device).expand(*alpha.shape, length)
    else:
        log_theta = theta.log()
        carry = exp_flushed(log_theta.cumsum(-1))
        pairs = segment_products(log_theta)
    # Gamma[t, j] = g_j for the window tokens j = t .. t+c-1 (window coordinates) of token t
    rows = torch.arange(length, device=alpha.device)[:, None]
    cols = torch.arange(length + window - 1, device=alpha.device)[None, :]
    band = (cols >= rows) & (cols < rows + window)
    return ChunkCoefficients(exp_flushed(log_alpha.cumsum(-1)), segment_products(log_alpha), carry, pairs,
                             band.to(g_window.dtype) * g_window.unsqueeze(-2))


class GdCoefficients(NamedTuple):
    """What the `gd` rule reads of the gates, per chunk ([.., NC, ...]; N = b + c - 1 window tokens)."""

    mixing: torch.Tensor            # MW [.., NC, b, N]: W_t (and y_t) read the rank-one gradients with it
    retain: torch.Tensor            # A_t [.., NC, b]: weight of W_s in W_t
    carry: Optional[torch.Tensor]   # F_t [.., NC, b]: weight of S_s in W_t (None: no momentum)
    end_mixing: torch.Tensor        # MW at the chunk's last token [.., NC, N]
    end_momentum: torch.Tensor      # MS at the chunk's last token [.., NC, N]
    ends: torch.Tensor              # (A, F, P) at the chunk's last token [.., NC, 3] (F = P = 0 without momentum)


def end_rows(x: torch.Tensor, last: int, features: int = 0) -> torch.Tensor:
    """[.., NC, b(, F)] -> [.., NC(, F)]: row b-1 of every chunk but the last, row `last` there
    (a sequence padded to whole chunks ends at token `last` of its final chunk)."""
    row = x.dim() - 1 - features
    ends = x.select(row, -1)
    if last in (-1, x.shape[row] - 1):
        return ends
    final = x.select(row - 1, -1).select(row - 1, last).unsqueeze(row - 1)
    return torch.cat([ends.narrow(row - 1, 0, ends.shape[row - 1] - 1), final], dim=row - 1)


def gd_coefficients(alpha: torch.Tensor, eta: torch.Tensor, theta: Optional[torch.Tensor],
                    g_window: torch.Tensor, window: int, last: int = -1) -> GdCoefficients:
    """alpha, eta, theta [.., NC, b] and g_window [.., NC, b + c - 1] (each chunk with its c - 1
    predecessors) -> the `gd` rule's coefficients; `last` is the last real token of the final chunk."""
    coef = chunk_coefficients(alpha, theta, g_window, window)
    if window == 1:   # Gamma = diag(g): its product is a column scaling
        momentum_rows = coef.momentum_pairs * (eta * g_window).unsqueeze(-2)
    else:
        momentum_rows = (coef.momentum_pairs * eta.unsqueeze(-2)) @ coef.window
    momentum_rows = flush_tiny(momentum_rows)
    mixing = flush_tiny(coef.retain_pairs @ momentum_rows)
    retain_end = end_rows(coef.retain, last)
    if coef.momentum_carry is None:
        carry = None
        zeros = torch.zeros_like(retain_end)
        ends = torch.stack([retain_end, zeros, zeros], dim=-1)
    else:
        carry = flush_tiny((coef.retain_pairs @ coef.momentum_carry.unsqueeze(-1)).squeeze(-1))
        ends = torch.stack([retain_end, end_rows(carry, last), end_rows(coef.momentum_carry, last)], dim=-1)
    return GdCoefficients(mixing, coef.retain, carry, end_rows(mixing, last, 1),
                          end_rows(momentum_rows, last, 1), ends)
