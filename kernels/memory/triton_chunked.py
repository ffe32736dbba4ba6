"""`memory_forward` with impl="triton": the chunk recurrence in fused Triton kernels.

Covered: kinds `linear` and `mlp`, rule `gd`, losses `l2` and `dot`, any window c with c - 1 <= b,
chunk sizes 16, 32, 64, feature degrees 1 and 2 while the lifted width D <= 128 (and, for `mlp`,
d_v <= 128; any hidden width), fp32 state, inputs in fp32, bf16 or fp16. `unsupported_reason` names
the first option outside that set; dispatch falls back to the PyTorch chunked form for it.

Split of work: PyTorch computes the parallel, chunk-local parts (feature maps phi, and the gate
coefficients of every chunk from log-space products, reusing `chunked.chunk_coefficients`); the
kernels run the sequential part, the state recurrence over chunks, forward and backward
(`triton_linear_kernels`; the MLP memory's in `triton_mlp` / `triton_mlp_kernels`). Autograd carries the kernels' coefficient and feature gradients back to
the gates, the feature coefficients `a` and q, k.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from kernels.triton_support import HAS_TRITON, IEEE, TF32, LaunchConfig, device_reason, next_pow2

from .features import feature_dim, poly_features
from .inputs import Prepared, finish, pad_tokens, prepare
from .triton_common import (CHUNKS, INPUT_DTYPES, GdCoefficients, cdiv, dtype_label, feature_dtype,
                            fold_windows, gd_coefficients, kernel_signature)
from .triton_mlp import MlpGd, mlp_meta, mlp_unsupported_reason
from .types import Gates, MemoryConfig, MemoryState

if HAS_TRITON:
    from .triton_linear_kernels import linear_gd_bwd, linear_gd_fwd
else:  # pragma: no cover - exercised only on installs without triton
    linear_gd_fwd = linear_gd_bwd = None

MAX_FEATURE_BLOCK = 128
KINDS = ("linear", "mlp")


def unsupported_reason(cfg: MemoryConfig, q: torch.Tensor, d_v: Optional[int] = None) -> Optional[str]:
    """None when impl="triton" covers `cfg` for inputs like q [B, T, H, d_k] and values of width d_v
    (default d_k); else the option at fault."""
    d_v = q.shape[-1] if d_v is None else d_v
    device = device_reason(linear_gd_fwd, q)
    if device is not None:
        return device
    if cfg.kind not in KINDS:
        return f"kind={cfg.kind!r} (Triton covers kind in {KINDS})"
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
    if cfg.kind == "mlp":
        return mlp_unsupported_reason(cfg, width, d_v, q.dtype)
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
    fp32_features: bool   # degree > 1: the lifted q, k arrive in fp32 (`feature_dtype`)


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
                      2 if cfg.chunk == 32 else 1, 1 if cfg.chunk == 16 else 2,
                      feature_dtype(dtype, cfg.degree) != dtype)


_FWD_POINTERS = ("Q", "X", "V", "MIX", "R", "CR", "MW", "MS", "ENDS", "W0", "S0", "Y", "WS", "SS",
                 "WF", "SF")
_BWD_POINTERS = ("Q", "X", "V", "MIX", "R", "CR", "MW", "MS", "ENDS", "WS", "SS", "DY", "DWF", "DSF",
                 "DQ", "DX", "DVAL", "DMIX", "DR", "DCR", "DMW", "DMS", "DENDS", "DW0", "DS0")


def _fwd_constexprs(meta: LinearMeta, save: bool) -> Dict[str, object]:
    return dict(CHUNK=meta.chunk, BLOCK_N=meta.block_n, BLOCK_D=meta.block_d,
                BLOCK_V=meta.block_v_fwd, L2=meta.l2, SAVE=save, PRECISION=meta.precision)


def _bwd_constexprs(meta: LinearMeta) -> Dict[str, object]:
    return dict(CHUNK=meta.chunk, BLOCK_N=meta.block_n, BLOCK_D=meta.block_d,
                BLOCK_V=meta.block_v_bwd, L2=meta.l2, PRECISION=meta.precision)


def linear_launch_configs(dtype: torch.dtype, meta: LinearMeta):
    """The compiled variants one launch with `meta` can use: forward with and without saving, backward."""
    label = (f"{dtype_label(dtype)}{'+fp32 features' if meta.fp32_features else ''} b={meta.chunk} "
             f"N={meta.block_n} D={meta.block_d} {'l2' if meta.l2 else 'dot'}")
    configs = []
    for save in (True, False):
        constexprs = _fwd_constexprs(meta, save)
        configs.append(LaunchConfig(
            f"linear_gd_fwd {label} V={meta.block_v_fwd} save={int(save)}", linear_gd_fwd,
            kernel_signature(_FWD_POINTERS, ("T_PAD", "D", "DV", "N_CHUNKS", "WIN"), constexprs,
                             dtype, meta.fp32_features),
            constexprs, meta.num_warps, meta.stages_fwd))
    constexprs = _bwd_constexprs(meta)
    configs.append(LaunchConfig(
        f"linear_gd_bwd {label} V={meta.block_v_bwd}", linear_gd_bwd,
        kernel_signature(_BWD_POINTERS, ("T_PAD", "D", "DV", "N_CHUNKS", "BH", "WIN"), constexprs,
                         dtype, meta.fp32_features),
        constexprs, meta.num_warps, meta.stages_bwd))
    return configs


def all_linear_metas():
    """Every (dtype, meta) a covered call can launch with. The window enters the code only through
    N = b + c - 1 (a runtime bound inside BLOCK_N), so one window per BLOCK_N value stands for all;
    16-bit inputs launch twice over, with features in the input dtype (degree 1) and in fp32."""
    for dtype in INPUT_DTYPES:
        for degree in ((1,) if dtype == torch.float32 else (1, 2)):
            for chunk in CHUNKS:
                for window in (1, chunk + 1):          # BLOCK_N = chunk, and 2 * chunk
                    for block_d in (16, 32, 64, 128):
                        for loss in ("l2", "dot"):
                            cfg = MemoryConfig("linear", "gd", loss, window, chunk, degree)
                            yield dtype, linear_meta(cfg, block_d, dtype)


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
        grid = (bh, cdiv(d_v, meta.block_v_fwd))
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
        parts = cdiv(d_v, meta.block_v_bwd)
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


# ----------------------------------------------------------------------------- entry point


def _flat(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, H, ...] -> contiguous [B*H, ...] in `dtype` (the kernels' layout)."""
    return x.to(dtype).flatten(0, 1).contiguous()


def _run_linear(prep: Prepared, cfg: MemoryConfig, q: torch.Tensor, x: torch.Tensor,
                values: torch.Tensor, coef: GdCoefficients):
    meta = linear_meta(cfg, q.shape[-1], values.dtype)
    y, w, s = _LinearGd.apply(q, x, values, *coef, _flat(prep.state.weights["W"]),
                              _flat(prep.state.momentum["W"]), meta)
    return y, {"W": w}, {"W": s}


def _run_mlp(prep: Prepared, cfg: MemoryConfig, q: torch.Tensor, x: torch.Tensor,
             values: torch.Tensor, coef: GdCoefficients):
    meta = mlp_meta(cfg, q.shape[-1], values.shape[-1], values.dtype)
    weights, momentum = prep.state.weights, prep.state.momentum
    y, w1, w2, s1, s2 = MlpGd.apply(q, x, values, *coef, _flat(weights["W1"]), _flat(weights["W2"]),
                                    _flat(momentum["W1"]), _flat(momentum["W2"]), meta)
    return y, {"W1": w1, "W2": w2}, {"W1": s1, "W2": s2}


def memory_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: Gates,
                          params: Dict[str, torch.Tensor], cfg: MemoryConfig,
                          state: Optional[MemoryState] = None
                          ) -> Tuple[torch.Tensor, MemoryState]:
    reason = unsupported_reason(cfg, q, v.shape[-1])
    if reason is not None:
        raise ValueError(f"impl='triton' does not cover {reason}; use impl='auto' or 'chunked'")
    prep = prepare(q, k, v, gates, params, cfg, state)
    batch, heads, length, d_k = prep.q.shape
    if length == 0:
        from .chunked import memory_forward_chunked
        return memory_forward_chunked(q, k, v, gates, params, cfg, state)
    chunk, window = cfg.chunk, cfg.window
    pad = -length % chunk
    # padding tokens: retention and momentum 1, learning rate and window gate 0, so they touch no
    # state; the chunk-end coefficients are read at the last real token anyway.
    coef = gd_coefficients(pad_tokens(prep.alpha, pad, 1.0), pad_tokens(prep.eta, pad, 0.0),
                           None if prep.theta is None else pad_tokens(prep.theta, pad, 1.0),
                           pad_tokens(prep.g_win, pad, 0.0), chunk, window, length)
    mlp_residual = cfg.kind == "mlp" and prep.residual
    # an MLP memory's key residual enters only the l2 error: E = r_k + A W1^T - V
    values = prep.v_win - prep.k_win if mlp_residual and cfg.loss == "l2" else prep.v_win
    run = _run_linear if cfg.kind == "linear" else _run_mlp
    lifted = feature_dtype(q.dtype, cfg.degree)
    y, weights, momentum = run(
        prep, cfg, _flat(pad_tokens(poly_features(prep.q, prep.a, cfg.degree), pad, 0.0), lifted),
        _flat(pad_tokens(poly_features(prep.k_win, prep.a, cfg.degree), pad, 0.0), lifted),
        _flat(pad_tokens(values, pad, 0.0), q.dtype), GdCoefficients(*(_flat(c) for c in coef)))
    y = y.unflatten(0, (batch, heads))[:, :, :length]
    if mlp_residual:
        y = y + prep.q
    unflat = lambda tensors: {n: t.unflatten(0, (batch, heads)) for n, t in tensors.items()}  # noqa: E731
    return finish(prep, y, unflat(weights), unflat(momentum), cfg)
