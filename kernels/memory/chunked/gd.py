"""The chunked `gd` rule for linear and mlp memories, all chunks at once where the state allows it.

Autograd differentiates the chunk-local parts, computed for every chunk in one batch: features,
the gate coefficients (`gd_coefficients`), the first layer's kernel and the read and update
pairs. The recurrence over chunks, the only sequential part, is `GdRecurrence` with its
hand-derived backward. The sequence is padded to whole chunks with tokens that change nothing
anyone reads (alpha = theta = 1, eta = g = 0, zero q, k, v); the chunk-end rows of the last chunk
are taken at its last real token, since a padded token still applies the momentum to W.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..features import poly_features, poly_kernel
from ..inputs import Prepared, pad_tokens, split_chunks
from ..types import MemoryConfig
from .coefficients import gd_coefficients
from .gd_recurrence import GdRecurrence, GdSpec

KINDS = ("linear", "mlp")
# (first layer, hidden layer) weight names; the first layer reads the features directly
LAYERS = {"linear": ("W", None), "mlp": ("W2", "W1")}


def _loop_layout(x: torch.Tensor) -> torch.Tensor:
    """[B, H, NC, ...] -> [NC, B*H, ...], contiguous: the recurrence reads one chunk at a time."""
    return x.movedim(2, 0).flatten(1, 2).contiguous()


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

    def chunks(x: torch.Tensor, value: float, window: int = 1) -> torch.Tensor:
        return split_chunks(pad_tokens(x, pad, value), size, window)

    coef = gd_coefficients(chunks(prep.alpha, 1.0), chunks(prep.eta, 0.0),
                           None if prep.theta is None else chunks(prep.theta, 1.0),
                           chunks(prep.g_win, 0.0, window), window, last)
    # the recurrence packs each coefficient with the sign it enters the state ops with
    if coef.carry is None:   # S_t is this chunk's own step only; W_t never reads S
        read_coef = coef.retain.unsqueeze(-1)
    else:
        read_coef = torch.stack([coef.retain, -coef.carry], dim=-1)
    ends = coef.ends * coef.ends.new_tensor([1.0, -1.0, 1.0])
    update_coef = torch.stack([-coef.end_mixing, coef.end_momentum], dim=-1)

    q, k = chunks(prep.q, 0.0), chunks(prep.k_win, 0.0, window)
    v = chunks(prep.v_win, 0.0, window)
    kernel = coef.mixing * poly_kernel(q, k, prep.a, cfg.degree)
    mlp, l2 = cfg.kind == "mlp", cfg.loss == "l2"
    residual = mlp and prep.residual
    target = v - k if residual and l2 else v   # the residual is part of the prediction

    first, hidden = LAYERS[cfg.kind]
    weights, momenta = prep.state.weights, prep.state.momentum
    loop = _loop_layout
    anchor = lambda name: None if prep.anchor is None or name is None else prep.anchor[name].flatten(0, 1)  # noqa: E731
    y, ws_first, ws_hidden = GdRecurrence.apply(
        GdSpec(mlp, l2), loop(poly_features(q, prep.a, cfg.degree)), loop(poly_features(k, prep.a, cfg.degree)),
        loop(target), loop(kernel), loop(ends), loop(read_coef), loop(update_coef),
        loop(coef.mixing) if mlp else None,
        _stacked_state(weights, momenta, first), _stacked_state(weights, momenta, hidden),
        anchor(first), anchor(hidden))
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
