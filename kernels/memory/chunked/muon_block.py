"""The `muon_block` rule in the chunked dual form: Newton-Schulz once per block of `ns_block` tokens.

The exact `muon` rule orthogonalises every token's momentum, one Newton-Schulz per token, matrix
and head: at the paper's sizes that is 150-470x a Transformer's FLOPs. `muon_block` keeps the exact
momentum S_t, takes normalised momentum steps inside a block of u tokens, and at the block's end
replaces what those steps moved by its orthogonalisation, at the block's summed learning rate (the
token loop in reference.py is the definition):

    W_t = alpha_t W_{t-1} - eta_t S_t sqrt(r) / ||S_t||_F                 inside the block
    W_e = B - lr NS(B - W_e),  B = (prod_block alpha) W_start,  lr = sum_m (prod_{m<r<=e} alpha_r) eta_m

so the block takes one orthogonal step as long as its tokens' steps together (the Muon optimiser's
step on a batch of u gradients), and every token between block ends reads weights that include the
block's steps so far (causal), at the scale of an orthogonal step (r = min(out, in): the Frobenius
norm of a full-rank orthogonal matrix). At ns_block = 1 every token ends a block and the rule is
`muon` exactly (NS is scale-invariant).

In the dual form all of a chunk's gradients are taken at its start weights (as for every rule), so
a chunk is processed in segments that end where blocks end: per segment, the reads are the `gd`
dual form with the normalised learning rates eta_m / nu_m (nu_m = ||S_m||_F / sqrt(r), from a
quadratic form over the segment's rank-one gradients, never S_m itself), and momentum and weights
move to the segment's end with rank-N products. One Newton-Schulz per block, matrix and head; no
per-token state is formed.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from kernels.newton_schulz import newton_schulz_auto
from kernels.precision import flush_threshold, flush_tiny

from ..memory_function import matmul_linear, memory_apply
from ..types import FIRST_LAYER, MemoryConfig
from .coefficients import chunk_coefficients

Factors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]
Tensor = torch.Tensor


def _plus_outer_sum(base: Tensor, coefficient: Tensor, factors: Tuple[Tensor, Tensor]) -> Tensor:
    """base + sum_j coefficient[..., j] delta_j x_j^T for delta [.., N, out], x [.., N, in]."""
    delta, inputs = factors
    return base + (delta * coefficient.unsqueeze(-1)).mT @ inputs


def momentum_norms(momentum_rows: Tensor, carry: Optional[Tensor], start: Tensor,
                   factors: Tuple[Tensor, Tensor]) -> Tensor:
    """||S_t||_F per token [.., L] for S_t = carry_t S + sum_j rows[t, j] delta_j x_j^T, without S_t:
    <d_j x_j^T, d_k x_k^T> = (d_j . d_k)(x_j . x_k) and <S, d_j x_j^T> = d_j^T S x_j."""
    delta, inputs = factors
    gram = (delta @ delta.mT) * (inputs @ inputs.mT)                       # [.., N, N]
    square = ((momentum_rows @ gram) * momentum_rows).sum(-1)
    if carry is not None:
        cross = ((delta @ start) * inputs).sum(-1)                        # [.., N]
        square = square + carry.square() * start.square().sum((-2, -1)).unsqueeze(-1) \
            + 2.0 * carry * (momentum_rows @ cross.unsqueeze(-1)).squeeze(-1)
    return square.clamp_min(0.0).sqrt()


def _segment(cfg: MemoryConfig, state: Dict[str, Tensor], factors: Factors, first_kernel: Tensor,
             u_q: Tensor, residual, alpha: Tensor, eta: Tensor, theta: Optional[Tensor], g_win: Tensor,
             ends_block: bool, anchor: Optional[Dict[str, Tensor]]) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Outputs of one segment (tokens [.., L]) and the state at its end."""
    names = cfg.weight_names
    coef = chunk_coefficients(alpha, theta, g_win, cfg.window)
    rows = flush_tiny(coef.momentum_pairs @ coef.window)    # S_t's rank-one weights, no eta: [.., L, N]
    carry = coef.momentum_carry                              # P_t (None: no momentum)
    retain = coef.retain
    end_weights = coef.retain_pairs[..., -1, :] * eta        # each token's lr, decayed to the end: [.., L]
    new: Dict[str, Tensor] = {}
    mixing, read_carry = {}, {}
    for name in names:
        start = state[f"momentum.{name}"]
        rank = min(start.shape[-2:])
        nu = momentum_norms(rows, carry, start, factors[name]) / rank ** 0.5
        scaled = eta / nu.clamp_min(flush_threshold(nu.dtype))
        mixing[name] = flush_tiny(coef.retain_pairs @ (scaled.unsqueeze(-1) * rows))
        read_carry[name] = None if carry is None else flush_tiny(coef.retain_pairs @ (scaled * carry).unsqueeze(-1))

    def linear(name: str, x: Tensor) -> Tensor:
        delta, inputs = factors[name]
        kernel = first_kernel if name in FIRST_LAYER else x @ inputs.mT
        out = retain.unsqueeze(-1) * (x @ state[f"weights.{name}"].mT) - (mixing[name] * kernel) @ delta
        if anchor is not None:   # anchored retention gives back (1 - A_t) W0
            out = out + (1.0 - retain.unsqueeze(-1)) * (x @ anchor[name].mT)
        if read_carry[name] is not None:
            out = out - read_carry[name] * (x @ state[f"momentum.{name}"].mT)
        return out

    y = memory_apply(cfg.kind, linear, u_q, residual)
    decay = retain[..., -1, None, None]
    lr = decay * state["lr"] + end_weights.sum(-1)[..., None, None]
    new["lr"] = lr
    for name in names:
        momentum = state[f"momentum.{name}"]
        end_carry = 0.0 if carry is None else carry[..., -1, None, None]
        new[f"momentum.{name}"] = _plus_outer_sum(end_carry * momentum, rows[..., -1, :], factors[name])
        base = decay * state[f"weights.{name}"] + (0.0 if anchor is None else (1.0 - decay) * anchor[name])
        if read_carry[name] is not None:
            base = base - read_carry[name][..., -1, :, None] * momentum
        new[f"weights.{name}"] = _plus_outer_sum(base, -mixing[name][..., -1, :], factors[name])
        new[f"start.{name}"] = decay * state[f"start.{name}"] + (0.0 if anchor is None else (1.0 - decay) * anchor[name])
    if ends_block:   # one orthogonal step for the block; its last token reads the result
        for name in names:
            update = new[f"start.{name}"] - new[f"weights.{name}"]     # what the block's steps moved
            weights = new[f"start.{name}"] - lr * newton_schulz_auto(update, cfg.ns_steps)
            new[f"weights.{name}"] = new[f"start.{name}"] = weights
        new["lr"] = torch.zeros_like(lr)
        last = memory_apply(cfg.kind, matmul_linear({n: new[f"weights.{n}"] for n in names}), u_q[..., -1:, :],
                            residual if isinstance(residual, float) else residual[..., -1:, :])
        y = torch.cat([y[..., :-1, :], last], dim=-2)
    return y, new


def segments(length: int, block_tokens: int, block: int) -> List[Tuple[int, int, bool]]:
    """(start, stop, ends_block) of a chunk's tokens, cut where orthogonalisation blocks end, for a
    chunk that starts `block_tokens` tokens into a block of `block` tokens."""
    out, start = [], 0
    while start < length:
        stop = min(length, start + block - block_tokens)
        ends = block_tokens + stop - start == block
        out.append((start, stop, ends))
        block_tokens = 0 if ends else block_tokens + stop - start
        start = stop
    return out


def muon_block_chunk(cfg: MemoryConfig, factors: Factors, first_kernel: Tensor, u_q: Tensor, residual,
                     alpha: Tensor, eta: Tensor, theta: Optional[Tensor], g_win: Tensor,
                     state: Dict[str, Tensor], block_tokens: int, anchor: Optional[Dict[str, Tensor]] = None
                     ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One chunk (all gradient factors taken at its start weights) under `muon_block`."""
    window = cfg.window
    outputs = []
    for start, stop, ends in segments(alpha.shape[-1], block_tokens, cfg.ns_block):
        win = slice(start, stop + window - 1)
        piece: Callable[[Tensor], Tensor] = lambda t: t[..., start:stop]  # noqa: E731
        seg_factors = {n: (d[..., win, :], x[..., win, :]) for n, (d, x) in factors.items()}
        y, state = _segment(cfg, state, seg_factors, first_kernel[..., start:stop, win], u_q[..., start:stop, :],
                            residual if isinstance(residual, float) else residual[..., start:stop, :],
                            piece(alpha), piece(eta), None if theta is None else piece(theta),
                            g_win[..., win], ends, anchor)
        outputs.append(y)
    if anchor is not None:
        state = {**state, **{f"anchor.{n}": w for n, w in anchor.items()}}
    return torch.cat(outputs, dim=-2), state
