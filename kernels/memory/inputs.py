"""Input handling shared by every implementation: checks, dtype, head-major layout, window buffer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from kernels.precision import flush_gradient

from .types import Gates, MemoryConfig, MemoryState, initial_state


@dataclass
class Prepared:
    """Head-major tensors in the compute dtype. Window tensors hold the carried c-1 tokens first."""

    q: torch.Tensor            # [B, H, T, d_k]
    k_win: torch.Tensor        # [B, H, c-1+T, d_k]
    v_win: torch.Tensor        # [B, H, c-1+T, d_v]
    g_win: torch.Tensor        # [B, H, c-1+T]
    alpha: torch.Tensor        # [B, H, T]
    eta: torch.Tensor          # [B, H, T]
    theta: Optional[torch.Tensor]  # [B, H, T] or None (no momentum)
    a: Optional[torch.Tensor]  # feature coefficients [p+1] (None for degree 1)
    residual: bool             # d_k == d_v: the unlifted key/query is added to an MLP memory
    anchor: Optional[Dict[str, torch.Tensor]]   # cfg.anchor: W0 per weight, [B, H, out, in] (else None)
    state: MemoryState         # incoming state, compute dtype
    out_dtype: torch.dtype

    @property
    def length(self) -> int:
        return self.q.shape[2]


def _check_shapes(q, k, v, gates: Gates, params: Dict[str, torch.Tensor], cfg: MemoryConfig) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, T, H, d_k]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, d_v] matching q {tuple(q.shape)}; got {tuple(v.shape)}")
    for name, gate in gates._asdict().items():
        if gate is not None and gate.shape != q.shape[:3]:
            raise ValueError(f"gate {name} must be [B, T, H] = {tuple(q.shape[:3])}; got {tuple(gate.shape)}")
    missing = [n for n in cfg.weight_names if n not in params]
    if missing:
        raise ValueError(f"params for kind={cfg.kind!r} need {', '.join(cfg.weight_names)}; missing {missing}")
    if cfg.degree > 1 and ("a" not in params or params["a"].shape != (cfg.degree + 1,)):
        raise ValueError(f"degree={cfg.degree} needs params['a'] of shape [{cfg.degree + 1}]")


def _head_major(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, T, ...] in `dtype`; its gradient leaves the operator flushed."""
    return flush_gradient(x.to(dtype)).transpose(1, 2)


def prepare(q, k, v, gates: Gates, params: Dict[str, torch.Tensor], cfg: MemoryConfig,
            state: Optional[MemoryState]) -> Prepared:
    _check_shapes(q, k, v, gates, params, cfg)
    dtype = torch.promote_types(q.dtype, cfg.state_dtype)
    batch, length, heads, d_k = q.shape
    d_v = v.shape[-1]
    if state is None:
        state = initial_state(params, cfg, batch, d_k, d_v, dtype, q.device)
    g = gates.g if gates.g is not None else torch.ones_like(gates.alpha)
    return Prepared(
        q=_head_major(q, dtype),
        k_win=torch.cat([_head_major(state.window_k, dtype), _head_major(k, dtype)], dim=2),
        v_win=torch.cat([_head_major(state.window_v, dtype), _head_major(v, dtype)], dim=2),
        g_win=torch.cat([_head_major(state.window_g, dtype), _head_major(g, dtype)], dim=2),
        alpha=_head_major(gates.alpha, dtype),
        eta=_head_major(gates.eta, dtype),
        theta=None if gates.theta is None else _head_major(gates.theta, dtype),
        a=flush_gradient(params["a"].to(dtype)) if cfg.degree > 1 else None,
        residual=d_k == d_v,
        anchor={n: flush_gradient(params[n].to(dtype)).unsqueeze(0).expand(batch, *params[n].shape)
                for n in cfg.weight_names} if cfg.anchor else None,
        state=MemoryState({n: flush_gradient(w.to(dtype)) for n, w in state.weights.items()},
                          {n: flush_gradient(s.to(dtype)) for n, s in state.momentum.items()},
                          state.window_k, state.window_v, state.window_g,
                          {n: flush_gradient(b.to(dtype)) for n, b in state.block.items()}, state.block_tokens),
        out_dtype=v.dtype,
    )


def finish(prep: Prepared, y: torch.Tensor, weights: Dict[str, torch.Tensor],
           momentum: Dict[str, torch.Tensor], cfg: MemoryConfig, block: Optional[Dict[str, torch.Tensor]] = None):
    """Back to [B, T, H, d_v] in the input dtype, plus the outgoing state (last c-1 window tokens;
    `block`: the open muon_block block, whose token count follows from the length)."""
    keep = prep.k_win.shape[2] - (cfg.window - 1)
    state = MemoryState(
        weights=weights,
        momentum=momentum,
        window_k=prep.k_win[:, :, keep:].transpose(1, 2),
        window_v=prep.v_win[:, :, keep:].transpose(1, 2),
        window_g=prep.g_win[:, :, keep:].transpose(1, 2),
        block=prep.state.block if block is None else block,
        block_tokens=(prep.state.block_tokens + prep.length) % cfg.ns_block if cfg.rule == "muon_block" else 0,
    )
    return y.transpose(1, 2).to(prep.out_dtype), state


def pad_tokens(x: torch.Tensor, count: int, value: float) -> torch.Tensor:
    """Appends `count` tokens along dim 2 of a head-major tensor [B, H, T(, F)]."""
    if count == 0:   # F.pad would still copy
        return x
    pad = (0, 0, 0, count) if x.dim() == 4 else (0, count)
    return F.pad(x, pad, value=value)


def retain(alpha: torch.Tensor, weights: torch.Tensor, anchor: Optional[torch.Tensor]) -> torch.Tensor:
    """alpha W, or W0 + alpha (W - W0) when retention is anchored at the initial weights W0."""
    return alpha * weights if anchor is None else anchor + alpha * (weights - anchor)


def split_chunks(x: torch.Tensor, size: int, window: int = 1) -> torch.Tensor:
    """[B, H, c-1 + NC*size(, F)] -> [B, H, NC, size + c-1(, F)], a view: chunk n with the c-1
    tokens before it (window 1: plain chunks)."""
    out = x.unfold(2, size + window - 1, size)
    return out if x.dim() == 3 else out.transpose(-1, -2)
