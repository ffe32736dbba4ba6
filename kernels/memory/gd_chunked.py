"""The chunked `gd` rule for linear and mlp memories, all chunks at once where the state allows it.

Autograd differentiates the chunk-local parts, computed for every chunk in one batch: features,
the gate coefficients (`chunk_coefficients`), the first layer's kernel and the read and update
pairs. The recurrence over chunks, the only sequential part, is `GdRecurrence` with its
hand-derived backward. The sequence is padded to whole chunks with tokens that change nothing
anyone reads (alpha = theta = 1, eta = g = 0, zero q, k, v); the chunk-end rows of the last chunk
are taken at its last real token, since a padded token still applies the momentum to W.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .chunk_gates import chunk_coefficients
from .features import poly_features, poly_kernel
from .gd_recurrence import GdRecurrence, GdSpec
from .inputs import Prepared, pad_tokens
from .types import MemoryConfig

KINDS = ("linear", "mlp")
# (first layer, hidden layer) weight names; the first layer reads the features directly
LAYERS = {"linear": ("W", None), "mlp": ("W2", "W1")}


def _loop_layout(x: torch.Tensor, size: int, window: int = 1) -> torch.Tensor:
    """[B, H, c-1 + NC*size, ...] -> [NC, B*H, size + c-1, ...], each chunk with its c-1 predecessors
    (window 1: plain chunks), contiguous: the recurrence reads one chunk at a time."""
    out = x.unfold(2, size + window - 1, size)
    out = out if x.dim() == 3 else out.transpose(-1, -2)
    return out.movedim(2, 0).flatten(1, 2).contiguous()


def _end_rows(x: torch.Tensor, last: int) -> torch.Tensor:
    """[NC, BH, b, ...] -> [NC, BH, ...]: row b-1 of every chunk but the last, row `last` there."""
    return torch.cat([x[:-1, :, -1], x[-1:, :, last]])


def _stacked_state(weights: Dict[str, torch.Tensor], momentum: Dict[str, torch.Tensor],
                   name: Optional[str]) -> Optional[torch.Tensor]:
    """[W | S] [B*H, out, 2*in] (gd_recurrence's state layout)."""
    return None if name is None else torch.cat([weights[name], momentum[name]], dim=-1).flatten(0, 1)


def gd_chunked(prep: Prepared, cfg: MemoryConfig
               ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Outputs y [B, H, T, d_v] and the final weights and momentum for kind in KINDS, rule gd."""
    size, window, length = cfg.chunk, cfg.window, prep.length
    batch, heads = prep.q.shape[:2]
    n_chunks = -(-length // size)
    pad, last = n_chunks * size - length, (length - 1) % size
    momentum = prep.theta is not None

    def chunks(x: torch.Tensor, value: float, window: int = 1) -> torch.Tensor:
        return _loop_layout(pad_tokens(x, pad, value), size, window)

    # everything below is [NC, B*H, ...]
    theta = chunks(prep.theta, 1.0) if momentum else None
    coef = chunk_coefficients(chunks(prep.alpha, 1.0), theta, chunks(prep.g_win, 0.0, window), window)
    eta = chunks(prep.eta, 0.0)
    if window == 1:   # Gamma = diag(g): its product is a column scaling
        momentum_rows = coef.momentum_pairs * (eta * chunks(prep.g_win, 0.0)).unsqueeze(-2)
    else:
        momentum_rows = (coef.momentum_pairs * eta.unsqueeze(-2)) @ coef.window
    mixing = coef.retain_pairs @ momentum_rows                 # S_t's and W_t's mixing
    retain_end = _end_rows(coef.retain, last)
    if momentum:
        carry = (coef.retain_pairs @ coef.momentum_carry.unsqueeze(-1)).squeeze(-1)
        read_coef = torch.stack([coef.retain, -carry], dim=-1)
        ends = torch.stack([retain_end, -_end_rows(carry, last), _end_rows(coef.momentum_carry, last)],
                           dim=-1)
    else:   # S_t is this chunk's own step only; W_t never reads S
        read_coef = coef.retain.unsqueeze(-1)
        zeros = torch.zeros_like(retain_end)
        ends = torch.stack([retain_end, zeros, zeros], dim=-1)
    update_coef = torch.stack([-_end_rows(mixing, last), _end_rows(momentum_rows, last)], dim=-1)

    q = chunks(prep.q, 0.0)
    k = chunks(prep.k_win, 0.0, window)
    v = chunks(prep.v_win, 0.0, window)
    kernel = mixing * poly_kernel(q, k, prep.a, cfg.degree)
    mlp, l2 = cfg.kind == "mlp", cfg.loss == "l2"
    residual = mlp and prep.residual
    target = v - k if residual and l2 else v   # the residual is part of the prediction

    first, hidden = LAYERS[cfg.kind]
    weights, momenta = prep.state.weights, prep.state.momentum
    y, ws_first, ws_hidden = GdRecurrence.apply(
        GdSpec(mlp, l2), poly_features(q, prep.a, cfg.degree), poly_features(k, prep.a, cfg.degree),
        target, kernel, ends, read_coef, update_coef, mixing if mlp else None,
        _stacked_state(weights, momenta, first), _stacked_state(weights, momenta, hidden))
    # [NC, B*H, b, d_v] -> [B, T, H, d_v] (the caller's layout) -> head-major view
    y = y.unflatten(1, (batch, heads)).permute(1, 0, 3, 2, 4)
    y = y.reshape(batch, n_chunks * size, heads, -1)[:, :length].transpose(1, 2)
    if residual:
        y = y + prep.q
    new_weights, new_momentum = {}, {}
    for name, ws in ((first, ws_first), (hidden, ws_hidden)):
        if name is not None:
            ws = ws.unflatten(0, (batch, heads))
            half = ws.shape[-1] // 2
            new_weights[name], new_momentum[name] = ws[..., :half], ws[..., half:]
    return y, new_weights, new_momentum
