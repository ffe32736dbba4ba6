"""The chunked dual form of the memory update, in PyTorch (DESIGN section 2).

Inside a chunk every gradient is taken at the chunk-start weights W_s, and each per-token gradient is
a rank-one product delta_i x_i^T. The momentum and retention recurrences are linear scalar scans, so

    gd:   W_t = A_t W_s - F_t S_s - sum_j M[t, j] delta_j x_j^T,     M = (L_A L_P diag(eta)) Gamma

with A_t = prod alpha, L_A[t, m] = prod_{m<r<=t} alpha_r, L_P the same for theta, F = L_A P and Gamma
the banded b x (b+c-1) Omega window matrix of the gates g. Reading W_t u then needs only matmuls with
W_s, S_s and a masked b x (b+c-1) kernel (the polynomial kernel on unlifted q, k for the first
layer), so per-token weights are never formed. The `muon` rule orthogonalises every token's
momentum, which is non-linear; there S_t and W_t are materialised per token (same coefficients).
The gate coefficients are in chunk_gates.py. The `gd` rule of linear and mlp memories runs as one
autograd Function over all chunks (gd_chunked.py); this module's chunk loop, differentiated by
autograd, covers the rest (gated_mlp with `gd`, and `muon`).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from kernels.newton_schulz import newton_schulz_auto  # Triton kernel on CUDA, PyTorch elsewhere

from .chunk_gates import ChunkCoefficients, chunk_coefficients  # noqa: F401 (triton_chunked imports them)
from .features import poly_features, poly_kernel
from .gd_chunked import KINDS as GD_KINDS, gd_chunked
from .inputs import finish, prepare
from .memory_function import gradient_factors, memory_apply
from .types import FIRST_LAYER, Gates, MemoryConfig, MemoryState

Factors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


def _plus_outer_sum(base: Optional[torch.Tensor], coefficient: torch.Tensor,
                    factors: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """base + sum_j coefficient[..., j] delta_j x_j^T for delta [.., N, out], x [.., N, in].

    Accumulates in place into the matmul's fresh output (autograd needs neither): state-sized
    temporaries dominate the memory traffic of the chunk loop.
    """
    delta, inputs = factors
    out = (delta * coefficient.unsqueeze(-1)).mT @ inputs
    return out if base is None else out.add_(base)


def _gd_chunk(cfg: MemoryConfig, coef: ChunkCoefficients, eta: torch.Tensor,
              factors: Factors, weights: Dict[str, torch.Tensor], momentum: Dict[str, torch.Tensor],
              first_kernel: torch.Tensor, u_q: torch.Tensor, residual):
    """Outputs and chunk-end state for the `gd` rule, without per-token weights."""
    mixing = (coef.retain_pairs @ (coef.momentum_pairs * eta.unsqueeze(-2))) @ coef.window
    retain = coef.retain.unsqueeze(-1)
    carry = None if coef.momentum_carry is None else (coef.retain_pairs @ coef.momentum_carry.unsqueeze(-1))

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        delta, inputs = factors[name]
        kernel = first_kernel if name in FIRST_LAYER else x @ inputs.mT
        out = retain * (x @ weights[name].mT) - (mixing * kernel) @ delta
        if carry is not None:
            out = out - carry * (x @ momentum[name].mT)
        return out

    y = memory_apply(cfg.kind, linear, u_q, residual)
    end_retain = coef.retain[..., -1, None, None]
    momentum_weights = ((coef.momentum_pairs[..., -1:, :] * eta.unsqueeze(-2)) @ coef.window).squeeze(-2)
    new_weights, new_momentum = {}, {}
    for name in factors:
        base_w, base_s = end_retain * weights[name], None
        if carry is not None:   # in place on fresh products, which autograd does not keep
            base_w = base_w.addcmul_(carry[..., -1, :, None], momentum[name], value=-1.0)
            base_s = coef.momentum_carry[..., -1, None, None] * momentum[name]
        new_weights[name] = _plus_outer_sum(base_w, -mixing[..., -1, :], factors[name])
        new_momentum[name] = _plus_outer_sum(base_s, momentum_weights, factors[name])
    return y, new_weights, new_momentum


def _muon_chunk(cfg: MemoryConfig, coef: ChunkCoefficients, eta: torch.Tensor,
                factors: Factors, weights: Dict[str, torch.Tensor], momentum: Dict[str, torch.Tensor],
                u_q: torch.Tensor, residual):
    """Outputs and chunk-end state for the `muon` rule: NS on every token's momentum."""
    momentum_mixing = coef.momentum_pairs @ coef.window            # S_t from S_s and the factors
    weight_mixing = coef.retain_pairs * eta.unsqueeze(-2)          # W_t from W_s and NS(S_m), m <= t
    per_token = {}
    new_weights, new_momentum = {}, {}
    for name, (delta, inputs) in factors.items():
        # S_t = P_t S_s + sum_j mixing[t, j] delta_j x_j^T, as one matmul over flattened outer products
        outer = (delta.unsqueeze(-1) * inputs.unsqueeze(-2)).flatten(-2)
        steps = (momentum_mixing @ outer).unflatten(-1, delta.shape[-1:] + inputs.shape[-1:])
        if coef.momentum_carry is not None:
            steps = steps + coef.momentum_carry[..., None, None] * momentum[name].unsqueeze(2)
        orthogonal = newton_schulz_auto(steps, cfg.ns_steps)
        shape = orthogonal.shape
        w_t = (coef.retain[..., None, None] * weights[name].unsqueeze(2)
               - (weight_mixing @ orthogonal.flatten(-2)).view(shape))
        per_token[name] = w_t
        new_weights[name], new_momentum[name] = w_t[:, :, -1], steps[:, :, -1]

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        return (per_token[name] @ x.unsqueeze(-1)).squeeze(-1)

    return memory_apply(cfg.kind, linear, u_q, residual), new_weights, new_momentum


def memory_forward_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: Gates,
                           params: Dict[str, torch.Tensor], cfg: MemoryConfig,
                           state: Optional[MemoryState] = None
                           ) -> Tuple[torch.Tensor, MemoryState]:
    prep = prepare(q, k, v, gates, params, cfg, state)
    if cfg.rule == "gd" and cfg.kind in GD_KINDS and prep.length > 0:   # one autograd Function
        return finish(prep, *gd_chunked(prep, cfg), cfg)
    weights, momentum = prep.state.weights, prep.state.momentum
    c, size = cfg.window, cfg.chunk
    # Chunks come from split() (one backward concat), never from slicing per chunk, whose backward
    # would allocate a full-length gradient for every chunk (quadratic in T). The window tokens are
    # a rolling tail of the last c-1 tokens carried from chunk to chunk.
    tails = [x[:, :, :c - 1] for x in (prep.k_win, prep.v_win, prep.g_win)]
    pieces = [x[:, :, c - 1:].split(size, dim=2) for x in (prep.k_win, prep.v_win, prep.g_win)]
    thetas = prep.theta.split(size, dim=2) if prep.theta is not None else [None] * len(pieces[0])
    outputs = []
    for q_c, k_c, v_c, g_c, alpha, eta, theta in zip(prep.q.split(size, dim=2), *pieces,
                                                     prep.alpha.split(size, dim=2),
                                                     prep.eta.split(size, dim=2), thetas):
        k_w, v_w, g_w = (torch.cat([tail, new], dim=2) for tail, new in zip(tails, (k_c, v_c, g_c)))
        tails = [x[:, :, x.shape[2] - (c - 1):] for x in (k_w, v_w, g_w)]
        factors = gradient_factors(cfg.kind, cfg.loss, weights, poly_features(k_w, prep.a, cfg.degree),
                                   k_w if prep.residual else torch.zeros_like(v_w), v_w)
        coef = chunk_coefficients(alpha, theta, g_w, c)
        u_q = poly_features(q_c, prep.a, cfg.degree)
        residual = q_c if prep.residual else 0.0
        if cfg.rule == "gd":
            first_kernel = poly_kernel(q_c, k_w, prep.a, cfg.degree)
            y, weights, momentum = _gd_chunk(cfg, coef, eta, factors, weights, momentum,
                                             first_kernel, u_q, residual)
        else:
            y, weights, momentum = _muon_chunk(cfg, coef, eta, factors, weights, momentum, u_q, residual)
        outputs.append(y)
    y = torch.cat(outputs, dim=2) if outputs else prep.q.new_zeros(*prep.q.shape[:3], v.shape[-1])
    return finish(prep, y, weights, momentum, cfg)
