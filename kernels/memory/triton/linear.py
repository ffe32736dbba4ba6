"""The linear memory (`kind="linear"`, rule `gd`) on the fused Triton kernels: launch choices and
autograd. Kernels in `linear_kernels.py`; coverage and the entry point in `__init__.py`."""
from __future__ import annotations

from typing import Dict, NamedTuple

import torch

from kernels.precision import backward_without_autocast
from kernels.triton_support import HAS_TRITON, IEEE, TF32, LaunchConfig, next_pow2

from ..types import MemoryConfig
from .common import CHUNKS, INPUT_DTYPES, cdiv, dtype_label, feature_dtype, fold_windows, kernel_signature

if HAS_TRITON:
    from .linear_kernels import linear_gd_bwd, linear_gd_fwd
else:  # pragma: no cover - exercised only on installs without triton
    linear_gd_fwd = linear_gd_bwd = None

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


class LinearGd(torch.autograd.Function):
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
    @backward_without_autocast
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
