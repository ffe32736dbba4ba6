"""`memory_forward` with impl="triton": the chunk recurrence in fused Triton kernels.

Covered: kind `linear`, rule `gd`, losses `l2` and `dot`, any window c with c - 1 <= b, chunk sizes
16, 32, 64, feature degrees 1 and 2 while the lifted width D <= 128, fp32 state, inputs in fp32,
bf16 or fp16. `unsupported_reason` names the first option outside that set; dispatch falls back to
the PyTorch chunked form for it.

Split of work: PyTorch computes the parallel, chunk-local parts (feature maps phi, and the gate
coefficients of every chunk from log-space products, reusing `chunked.chunk_coefficients`); the
kernels run the sequential part, the state recurrence over chunks, forward and backward
(`triton_linear_kernels`). Autograd carries the kernels' coefficient and feature gradients back to
the gates, the feature coefficients `a` and q, k.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from kernels.triton_support import (HAS_TRITON, IEEE, TF32, TRITON_DTYPES, LaunchConfig,
                                    device_reason, next_pow2)

from .chunked import chunk_coefficients
from .features import feature_dim, poly_features
from .inputs import finish, prepare
from .types import Gates, MemoryConfig, MemoryState

if HAS_TRITON:
    from .triton_linear_kernels import linear_gd_bwd, linear_gd_fwd
else:  # pragma: no cover - exercised only on installs without triton
    linear_gd_fwd = linear_gd_bwd = None

CHUNKS = (16, 32, 64)
MAX_FEATURE_BLOCK = 128
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reason(cfg: MemoryConfig, q: torch.Tensor) -> Optional[str]:
    """None when impl="triton" covers `cfg` for inputs like q [B, T, H, d_k]; else the option at fault."""
    device = device_reason(linear_gd_fwd, q)
    if device is not None:
        return device
    if cfg.kind != "linear":
        return f"kind={cfg.kind!r} (Triton covers kind='linear')"
    if cfg.rule != "gd":
        return f"rule={cfg.rule!r} (Triton covers rule='gd')"
    if cfg.chunk not in CHUNKS:
        return f"chunk={cfg.chunk} (Triton covers chunk in {CHUNKS})"
    if cfg.window - 1 > cfg.chunk:
        return f"window={cfg.window} with chunk={cfg.chunk} (Triton needs window - 1 <= chunk)"
    if cfg.state_dtype != torch.float32:
        return f"state_dtype={cfg.state_dtype} (Triton keeps the state in torch.float32)"
    if q.dtype not in INPUT_DTYPES:
        return f"input dtype {q.dtype} (Triton covers {', '.join(map(str, INPUT_DTYPES))})"
    width = feature_dim(q.shape[-1], cfg.degree)
    if next_pow2(width) > MAX_FEATURE_BLOCK:
        return (f"feature width D={width} (d_k={q.shape[-1]}, degree={cfg.degree}); "
                f"Triton keeps the state in registers and covers D <= {MAX_FEATURE_BLOCK}")
    return None


# ----------------------------------------------------------------------------- launch configuration


class LinearMeta(NamedTuple):
    chunk: int
    window: int
    block_n: int
    block_d: int
    block_v_fwd: int
    block_v_bwd: int
    l2: bool
    precision: str
    num_warps: int
    stages_fwd: int
    stages_bwd: int


def linear_meta(cfg: MemoryConfig, width: int, dtype: torch.dtype) -> LinearMeta:
    """Every compile-time choice of a launch; `all_linear_metas` enumerates their range.

    Blocks and pipelining stages were picked from an sm_90 ahead-of-time sweep (no GPU at hand) as
    the variants with the fewest spilled bytes at D = 64: the state rows stay in registers, and
    16 rows per program leave room for the b x N and N x D tiles of the backward.
    """
    block_d = next_pow2(width)
    return LinearMeta(cfg.chunk, cfg.window, next_pow2(cfg.chunk + cfg.window - 1), block_d,
                      32 if cfg.chunk == 16 and block_d <= 64 else 16, 16, cfg.loss == "l2",
                      IEEE if dtype == torch.float32 else TF32, 8,
                      2 if cfg.chunk == 32 else 1, 1 if cfg.chunk == 16 else 2)


_FWD_POINTERS = ("Q", "X", "V", "MIX", "R", "CR", "MW", "MS", "ENDS", "W0", "S0", "Y", "WS", "SS",
                 "WF", "SF")
_BWD_POINTERS = ("Q", "X", "V", "MIX", "R", "CR", "MW", "MS", "ENDS", "WS", "SS", "DY", "DWF", "DSF",
                 "DQ", "DX", "DVAL", "DMIX", "DR", "DCR", "DMW", "DMS", "DENDS", "DW0", "DS0")
_INPUT_POINTERS = ("Q", "X", "V")   # loaded in the input dtype; everything else is fp32


def _signature(pointers, scalars, constexprs, dtype: torch.dtype) -> Dict[str, str]:
    input_type = "*" + TRITON_DTYPES[str(dtype).removeprefix("torch.")]
    sig = {p: input_type if p in _INPUT_POINTERS else "*fp32" for p in pointers}
    sig.update({s: "i32" for s in scalars})
    sig.update({c: "constexpr" for c in constexprs})
    return sig


def _fwd_constexprs(meta: LinearMeta, save: bool) -> Dict[str, object]:
    return dict(CHUNK=meta.chunk, BLOCK_N=meta.block_n, BLOCK_D=meta.block_d,
                BLOCK_V=meta.block_v_fwd, L2=meta.l2, SAVE=save, PRECISION=meta.precision)


def _bwd_constexprs(meta: LinearMeta) -> Dict[str, object]:
    return dict(CHUNK=meta.chunk, BLOCK_N=meta.block_n, BLOCK_D=meta.block_d,
                BLOCK_V=meta.block_v_bwd, L2=meta.l2, PRECISION=meta.precision)


def linear_launch_configs(dtype: torch.dtype, meta: LinearMeta):
    """The compiled variants one launch with `meta` can use: forward with and without saving, backward."""
    label = (f"{TRITON_DTYPES[str(dtype).removeprefix('torch.')]} b={meta.chunk} "
             f"N={meta.block_n} D={meta.block_d} {'l2' if meta.l2 else 'dot'}")
    configs = []
    for save in (True, False):
        constexprs = _fwd_constexprs(meta, save)
        configs.append(LaunchConfig(
            f"linear_gd_fwd {label} V={meta.block_v_fwd} save={int(save)}", linear_gd_fwd,
            _signature(_FWD_POINTERS, ("T_PAD", "D", "DV", "N_CHUNKS", "WIN"), constexprs, dtype),
            constexprs, meta.num_warps, meta.stages_fwd))
    constexprs = _bwd_constexprs(meta)
    configs.append(LaunchConfig(
        f"linear_gd_bwd {label} V={meta.block_v_bwd}", linear_gd_bwd,
        _signature(_BWD_POINTERS, ("T_PAD", "D", "DV", "N_CHUNKS", "BH", "WIN"), constexprs, dtype),
        constexprs, meta.num_warps, meta.stages_bwd))
    return configs


def all_linear_metas():
    """Every (dtype, meta) a covered call can launch with. The window enters the code only through
    N = b + c - 1 (a runtime bound inside BLOCK_N), so one window per BLOCK_N value stands for all."""
    for dtype in INPUT_DTYPES:
        for chunk in CHUNKS:
            for window in (1, chunk + 1):          # BLOCK_N = chunk, and 2 * chunk
                for block_d in (16, 32, 64, 128):
                    for loss in ("l2", "dot"):
                        cfg = MemoryConfig("linear", "gd", loss, window, chunk)
                        yield dtype, linear_meta(cfg, block_d, dtype)


# ----------------------------------------------------------------------------- gate coefficients


class GdCoefficients(NamedTuple):
    mixing: torch.Tensor   # [B, H, NC, b, N]: y and W_t read the chunk's rank-one gradients with it
    retain: torch.Tensor   # [B, H, NC, b]: A_t
    carry: torch.Tensor    # [B, H, NC, b]: weight of S_s in W_t (zero without momentum)
    end_w: torch.Tensor    # [B, H, NC, N]: mixing row of the chunk's last token
    end_s: torch.Tensor    # [B, H, NC, N]: momentum weights of the chunk's last token
    ends: torch.Tensor     # [B, H, NC, 3]: A, carry and P at the chunk's last token


def _last_rows(x: torch.Tensor, last: int) -> torch.Tensor:
    """[.., NC, b(, F)] -> [.., NC(, F)]: row b-1 of every chunk but the last, row `last` there."""
    return torch.cat([x[..., :-1, -1, :] if x.dim() > 4 else x[..., :-1, -1],
                      x[..., -1:, last, :] if x.dim() > 4 else x[..., -1:, last]], dim=2)


def gd_coefficients(alpha: torch.Tensor, eta: torch.Tensor, theta: Optional[torch.Tensor],
                    g_win: torch.Tensor, chunk: int, window: int, length: int) -> GdCoefficients:
    """Gate algebra of every chunk at once (alpha, eta, theta [B, H, T_pad], g_win [B, H, T_pad+c-1]);
    the same coefficients as `chunked._gd_chunk`, with the chunk-end rows taken at the last real token."""
    split = lambda x: x.unflatten(-1, (x.shape[-1] // chunk, chunk))  # noqa: E731
    coef = chunk_coefficients(split(alpha), None if theta is None else split(theta),
                              g_win.unfold(-1, chunk + window - 1, chunk), window)
    momentum_rows = (coef.momentum_pairs * split(eta).unsqueeze(-2)) @ coef.window
    mixing = coef.retain_pairs @ momentum_rows
    if coef.momentum_carry is None:
        carry = torch.zeros_like(coef.retain)
        momentum_carry = carry
    else:
        carry = (coef.retain_pairs @ coef.momentum_carry.unsqueeze(-1)).squeeze(-1)
        momentum_carry = coef.momentum_carry
    last = (length - 1) % chunk
    ends = torch.stack([_last_rows(coef.retain, last), _last_rows(carry, last),
                        _last_rows(momentum_carry, last)], dim=-1)
    return GdCoefficients(mixing, coef.retain, carry, _last_rows(mixing, last),
                          _last_rows(momentum_rows, last), ends)


def fold_windows(per_chunk: torch.Tensor, chunk: int, window: int) -> torch.Tensor:
    """[.., NC, b+c-1, F] per-chunk window rows -> [.., NC*b + c-1, F], summing rows two chunks share."""
    n_chunks = per_chunk.shape[-3]
    out = F.pad(per_chunk[..., :chunk, :].flatten(-3, -2), (0, 0, 0, chunk))
    if window > 1:   # chunk n's rows b.. sit where chunk n+1's first c-1 rows sit
        tail = F.pad(per_chunk[..., chunk:, :], (0, 0, 0, chunk - (window - 1))).flatten(-3, -2)
        out = out + F.pad(tail, (0, 0, chunk, 0))
    return out[..., :n_chunks * chunk + window - 1, :]


# ----------------------------------------------------------------------------- autograd


class _LinearGd(torch.autograd.Function):
    """Inputs flattened over (batch, head): q [BH, Tp, D], x [BH, Tp+c-1, D], v [BH, Tp+c-1, d_v],
    coefficients [BH, NC, ...], w0/s0 [BH, d_v, D]. Returns y [BH, Tp, d_v] and the final W, S (fp32)."""

    @staticmethod
    def forward(ctx, q, x, v, mixing, retain, carry, end_w, end_s, ends, w0, s0, meta: LinearMeta):
        bh, t_pad, width = q.shape
        d_v = v.shape[-1]
        n_chunks = t_pad // meta.chunk
        save = any(ctx.needs_input_grad)
        f32 = dict(dtype=torch.float32, device=q.device)
        y = torch.empty(bh, t_pad, d_v, **f32)
        w_final, s_final = torch.empty(bh, d_v, width, **f32), torch.empty(bh, d_v, width, **f32)
        shape = (bh, n_chunks, d_v, width) if save else (1,)
        w_saved, s_saved = torch.empty(shape, **f32), torch.empty(shape, **f32)
        grid = (bh, triton_cdiv(d_v, meta.block_v_fwd))
        linear_gd_fwd[grid](q, x, v, mixing, retain, carry, end_w, end_s, ends, w0, s0, y,
                            w_saved, s_saved, w_final, s_final, t_pad, width, d_v, n_chunks,
                            meta.window,
                            **_fwd_constexprs(meta, save), num_warps=meta.num_warps,
                            num_stages=meta.stages_fwd)
        if save:
            ctx.save_for_backward(q, x, v, mixing, retain, carry, end_w, end_s, ends, w_saved, s_saved)
        ctx.meta = meta
        return y, w_final, s_final

    @staticmethod
    def backward(ctx, dy, dw_final, ds_final):
        q, x, v, mixing, retain, carry, end_w, end_s, ends, w_saved, s_saved = ctx.saved_tensors
        meta: LinearMeta = ctx.meta
        bh, t_pad, width = q.shape
        d_v = v.shape[-1]
        n_chunks = t_pad // meta.chunk
        n_win = meta.chunk + meta.window - 1
        parts = triton_cdiv(d_v, meta.block_v_bwd)
        f32 = dict(dtype=torch.float32, device=q.device)

        def grad_or_zeros(g, like):
            return torch.zeros(like, **f32) if g is None else g.float().contiguous()

        dy = grad_or_zeros(dy, (bh, t_pad, d_v))
        dw_final = grad_or_zeros(dw_final, (bh, d_v, width))
        ds_final = grad_or_zeros(ds_final, (bh, d_v, width))
        dq = torch.empty(parts, bh, t_pad, width, **f32)
        dx = torch.empty(parts, bh, n_chunks, n_win, width, **f32)
        dv = torch.empty(bh, n_chunks, n_win, d_v, **f32)
        dmix = torch.empty(parts, bh, n_chunks, meta.chunk, n_win, **f32)
        dr, dcr = (torch.empty(parts, bh, n_chunks, meta.chunk, **f32) for _ in range(2))
        dmw, dms = (torch.empty(parts, bh, n_chunks, n_win, **f32) for _ in range(2))
        dends = torch.empty(parts, bh, n_chunks, 3, **f32)
        dw0, ds0 = torch.empty(bh, d_v, width, **f32), torch.empty(bh, d_v, width, **f32)
        linear_gd_bwd[(bh, parts)](q, x, v, mixing, retain, carry, end_w, end_s, ends, w_saved, s_saved,
                                   dy, dw_final, ds_final, dq, dx, dv, dmix, dr, dcr, dmw, dms, dends,
                                   dw0, ds0, t_pad, width, d_v, n_chunks, bh, meta.window,
                                   **_bwd_constexprs(meta), num_warps=meta.num_warps,
                                   num_stages=meta.stages_bwd)
        dx = fold_windows(dx.sum(0), meta.chunk, meta.window)
        dv = fold_windows(dv, meta.chunk, meta.window)
        return (dq.sum(0).to(q.dtype), dx.to(x.dtype), dv.to(v.dtype), dmix.sum(0), dr.sum(0),
                dcr.sum(0), dmw.sum(0), dms.sum(0), dends.sum(0), dw0, ds0, None)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- entry point


def _pad_tokens(x: torch.Tensor, count: int, value: float) -> torch.Tensor:
    """Appends `count` tokens along dim 2 of a head-major tensor [B, H, T(, F)]."""
    if count == 0:
        return x
    pad = (0, 0, 0, count) if x.dim() == 4 else (0, count)
    return F.pad(x, pad, value=value)


def memory_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: Gates,
                          params: Dict[str, torch.Tensor], cfg: MemoryConfig,
                          state: Optional[MemoryState] = None
                          ) -> Tuple[torch.Tensor, MemoryState]:
    reason = unsupported_reason(cfg, q)
    if reason is not None:
        raise ValueError(f"impl='triton' does not cover {reason}; use impl='auto' or 'chunked'")
    prep = prepare(q, k, v, gates, params, cfg, state)
    batch, heads, length, d_k = prep.q.shape
    if length == 0:
        from .chunked import memory_forward_chunked
        return memory_forward_chunked(q, k, v, gates, params, cfg, state)
    d_v = prep.v_win.shape[-1]
    chunk, window = cfg.chunk, cfg.window
    pad = -length % chunk
    t_pad = length + pad
    # padding tokens: retention and momentum 1, learning rate and window gate 0, so they touch no
    # state; the chunk-end coefficients are read at the last real token anyway.
    coef = gd_coefficients(_pad_tokens(prep.alpha, pad, 1.0), _pad_tokens(prep.eta, pad, 0.0),
                           None if prep.theta is None else _pad_tokens(prep.theta, pad, 1.0),
                           _pad_tokens(prep.g_win, pad, 0.0), chunk, window, length)
    in_dtype = q.dtype
    features_q = _pad_tokens(poly_features(prep.q, prep.a, cfg.degree), pad, 0.0)
    features_k = _pad_tokens(poly_features(prep.k_win, prep.a, cfg.degree), pad, 0.0)
    values = _pad_tokens(prep.v_win, pad, 0.0)
    width = features_q.shape[-1]
    meta = linear_meta(cfg, width, in_dtype)

    def flat(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return x.to(dtype).flatten(0, 1).contiguous()

    y, w_final, s_final = _LinearGd.apply(
        flat(features_q, in_dtype), flat(features_k, in_dtype), flat(values, in_dtype),
        *(flat(c) for c in coef), flat(prep.state.weights["W"]), flat(prep.state.momentum["W"]), meta)
    y = y.view(batch, heads, t_pad, d_v)[:, :, :length]
    weights = {"W": w_final.view(batch, heads, d_v, width)}
    momentum = {"W": s_final.view(batch, heads, d_v, width)}
    return finish(prep, y, weights, momentum, cfg)
