"""The MLP memory (`kind="mlp"`, rule `gd`) on the fused Triton kernels: launch choices and autograd.

Kernels in `mlp_kernels.py`. The PyTorch side prepares what the linear path prepares (lifted
features, gate coefficients of every chunk) and two things of the MLP's own: the key residual is
folded into the targets (E = r_k + A W1^T - V = A W1^T - (V - r_k)), and the query residual is
added to the kernel's output, so the kernels never see the unlifted keys.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from kernels.precision import backward_without_autocast
from kernels.triton_support import HAS_TRITON, IEEE, TF32, LaunchConfig, next_pow2

from ..types import MemoryConfig
from .common import CHUNKS, INPUT_DTYPES, dtype_label, feature_dtype, fold_windows, kernel_signature

if HAS_TRITON:
    from .mlp_kernels import mlp_gd_bwd, mlp_gd_fwd
else:  # pragma: no cover - exercised only on installs without triton
    mlp_gd_fwd = mlp_gd_bwd = None

# One program holds a chunk's window tiles [N, D], [N, d_v] and [b, N] whole while it loops over the
# hidden units; past 64 for N, D or d_v the backward's shared memory outgrows an A100's 163 KiB
# (measured ahead of time: b = 64, N = D = d_v = 64 needs 148-152 KiB on sm_80; N = 128 or
# D = d_v = 128 needs 200-390 KiB).
MAX_TILE = 64
HIDDEN_BLOCK = 16       # hidden units per step of the kernels' loop over d_h (any d_h is covered)


# 16-bit values with fp32 (lifted) features add conversion buffers: at b = 64 and D = d_v = 64 the
# backward needs 172-221 KiB on sm_80 (measured ahead of time), so that pairing stops at 32.
MAX_TILE_MIXED_B64 = 32


def mlp_unsupported_reason(cfg: MemoryConfig, width: int, d_v: int, dtype: torch.dtype
                           ) -> Optional[str]:
    """None when the MLP kernels cover lifted width `width`, value width d_v and inputs of `dtype`,
    else the reason."""
    for name, value in (("lifted key width D", width), ("value width d_v", d_v),
                        ("window tokens per chunk b + c - 1", cfg.chunk + cfg.window - 1)):
        if next_pow2(value) > MAX_TILE:
            return (f"{name}={value} with kind='mlp' (the MLP kernels hold a chunk's tiles whole "
                    f"and cover up to {MAX_TILE})")
    mixed = feature_dtype(dtype, cfg.degree) != dtype
    if mixed and cfg.chunk == 64 and max(next_pow2(width), next_pow2(d_v)) > MAX_TILE_MIXED_B64:
        return (f"lifted key width D={width} / d_v={d_v} with kind='mlp', degree={cfg.degree}, "
                f"chunk=64 and {dtype} inputs (the backward's shared memory; covered up to "
                f"{MAX_TILE_MIXED_B64}, or with chunk <= 32)")
    return None


class MlpMeta(NamedTuple):
    chunk: int
    window: int
    block_n: int
    block_dv: int          # one block for both D and d_v (masked separately): fewer variants
    block_h: int
    l2: bool
    precision: str
    num_warps: int
    num_stages: int
    fp32_features: bool    # degree > 1: the lifted q, k arrive in fp32 (`feature_dtype`)


def mlp_meta(cfg: MemoryConfig, width: int, d_v: int, dtype: torch.dtype) -> MlpMeta:
    """Every compile-time choice of a launch; `all_mlp_metas` enumerates their range."""
    return MlpMeta(cfg.chunk, cfg.window, next_pow2(cfg.chunk + cfg.window - 1),
                   max(next_pow2(width), next_pow2(d_v)), HIDDEN_BLOCK, cfg.loss == "l2",
                   IEEE if dtype == torch.float32 else TF32, 8, 1,
                   feature_dtype(dtype, cfg.degree) != dtype)


_FWD_POINTERS = ("Q", "X", "V", "MIX", "R", "CR", "MW", "MS", "ENDS", "W1", "W2", "S1", "S2", "Y")
_BWD_POINTERS = ("Q", "X", "V", "MIX", "R", "CR", "MW", "MS", "ENDS", "W1", "W2", "S1", "S2", "DY",
                 "DW1", "DW2", "DS1", "DS2", "DQ", "DX", "DVAL", "DMIX", "DR", "DCR", "DMW", "DMS",
                 "DENDS")
_SCALARS = ("T_PAD", "D", "DV", "DH", "N_CHUNKS", "WIN")


def _constexprs(meta: MlpMeta) -> Dict[str, object]:
    return dict(CHUNK=meta.chunk, BLOCK_N=meta.block_n, BLOCK_D=meta.block_dv, BLOCK_V=meta.block_dv,
                BLOCK_H=meta.block_h, L2=meta.l2, PRECISION=meta.precision)


def mlp_launch_configs(dtype: torch.dtype, meta: MlpMeta) -> List[LaunchConfig]:
    """The compiled variants one launch with `meta` can use: forward with and without saving, backward."""
    label = (f"{dtype_label(dtype)}{'+fp32 features' if meta.fp32_features else ''} b={meta.chunk} "
             f"N={meta.block_n} D=V={meta.block_dv} H={meta.block_h} {'l2' if meta.l2 else 'dot'}")
    configs = []
    for save in (True, False):
        constexprs = dict(_constexprs(meta), SAVE=save)
        configs.append(LaunchConfig(
            f"mlp_gd_fwd {label} save={int(save)}", mlp_gd_fwd,
            kernel_signature(_FWD_POINTERS, _SCALARS, constexprs, dtype, meta.fp32_features),
            constexprs, meta.num_warps, meta.num_stages))
    constexprs = _constexprs(meta)
    configs.append(LaunchConfig(
        f"mlp_gd_bwd {label}", mlp_gd_bwd,
        kernel_signature(_BWD_POINTERS, _SCALARS, constexprs, dtype, meta.fp32_features),
        constexprs, meta.num_warps, meta.num_stages))
    return configs


def all_mlp_metas() -> Iterator[Tuple[torch.dtype, MlpMeta]]:
    """Every (dtype, meta) a covered call can launch with. As for the linear kernels the window
    enters only through BLOCK_N, and the hidden width d_h only as a runtime loop bound."""
    for dtype in INPUT_DTYPES:
        for degree in ((1,) if dtype == torch.float32 else (1, 2)):   # fp32: features are fp32 anyway
            for chunk in CHUNKS:
                for window in sorted({1, min(chunk + 1, MAX_TILE - chunk + 1)}):
                    for width in (16, 32, 64):
                        for loss in ("l2", "dot"):
                            cfg = MemoryConfig("mlp", "gd", loss, window, chunk, degree)
                            if mlp_unsupported_reason(cfg, width, width, dtype) is None:
                                yield dtype, mlp_meta(cfg, width, width, dtype)


class MlpGd(torch.autograd.Function):
    """Inputs flattened over (batch, head): q [BH, Tp, D], x [BH, Tp+c-1, D], v [BH, Tp+c-1, d_v],
    coefficients [BH, NC, ...], w1/s1 [BH, d_v, d_h], w2/s2 [BH, d_h, D]. Returns y [BH, Tp, d_v]
    and the final W1, W2, S1, S2 (fp32)."""

    @staticmethod
    def forward(ctx, q, x, v, mixing, retain, carry, end_w, end_s, ends, w1, w2, s1, s2,
                meta: MlpMeta):
        bh, t_pad, width = q.shape
        d_v, d_h = w1.shape[1:]
        n_chunks = t_pad // meta.chunk
        save = any(ctx.needs_input_grad)
        slots = n_chunks + 1 if save else 2
        f32 = dict(dtype=torch.float32, device=q.device)
        buffers = []
        for initial in (w1, w2, s1, s2):   # slot 0: the initial state; the kernel fills the rest
            buffer = torch.empty(bh, slots, *initial.shape[1:], **f32)
            buffer[:, 0] = initial
            buffers.append(buffer)
        y = torch.empty(bh, t_pad, d_v, **f32)
        mlp_gd_fwd[(bh,)](q, x, v, mixing, retain, carry, end_w, end_s, ends, *buffers, y,
                          t_pad, width, d_v, d_h, n_chunks, meta.window,
                          **_constexprs(meta), SAVE=save, num_warps=meta.num_warps,
                          num_stages=meta.num_stages)
        last = n_chunks if save else n_chunks % 2
        finals = [b[:, last].clone() for b in buffers]
        if save:
            ctx.save_for_backward(q, x, v, mixing, retain, carry, end_w, end_s, ends, *buffers)
        ctx.meta = meta
        return (y, *finals)

    @staticmethod
    @backward_without_autocast
    def backward(ctx, dy, *d_finals):
        q, x, v, mixing, retain, carry, end_w, end_s, ends, *states = ctx.saved_tensors
        meta: MlpMeta = ctx.meta
        bh, t_pad, width = q.shape
        d_v = v.shape[-1]
        n_chunks = t_pad // meta.chunk
        n_win = meta.chunk + meta.window - 1
        f32 = dict(dtype=torch.float32, device=q.device)
        dy = torch.zeros(bh, t_pad, d_v, **f32) if dy is None else dy.float().contiguous()
        d_states = []
        for grad, state in zip(d_finals, states):   # two alternating slots; slot 0: the final state's
            buffer = torch.zeros(bh, 2, *state.shape[2:], **f32)
            if grad is not None:
                buffer[:, 0] = grad
            d_states.append(buffer)
        dq = torch.empty(bh, t_pad, width, **f32)
        dx = torch.empty(bh, n_chunks, n_win, width, **f32)
        dv = torch.empty(bh, n_chunks, n_win, d_v, **f32)
        dmix = torch.empty(bh, n_chunks, meta.chunk, n_win, **f32)
        dr, dcr = (torch.empty(bh, n_chunks, meta.chunk, **f32) for _ in range(2))
        dmw, dms = (torch.empty(bh, n_chunks, n_win, **f32) for _ in range(2))
        dends = torch.empty(bh, n_chunks, 3, **f32)
        mlp_gd_bwd[(bh,)](q, x, v, mixing, retain, carry, end_w, end_s, ends, *states, dy,
                          *d_states, dq, dx, dv, dmix, dr, dcr, dmw, dms, dends,
                          t_pad, width, d_v, states[0].shape[-1], n_chunks, meta.window,
                          **_constexprs(meta), num_warps=meta.num_warps, num_stages=meta.num_stages)
        initial = [b[:, n_chunks % 2] for b in d_states]
        return (dq.to(q.dtype), fold_windows(dx, meta.chunk, meta.window).to(x.dtype),
                fold_windows(dv, meta.chunk, meta.window).to(v.dtype), dmix, dr, dcr, dmw, dms, dends,
                *initial, None)
