"""impl="triton": the `gd` chunk recurrence of linear and MLP memories in fused Triton kernels.

Covered: kinds `linear` and `mlp`, rule `gd`, losses `l2` and `dot`, any window c with c - 1 <= b,
chunk sizes 16, 32, 64, feature degrees 1 and 2 while the lifted width D <= 128 (and, for `mlp`,
D, d_v <= 64; any hidden width), fp32 state, inputs in fp32, bf16 or fp16. `unsupported_reason`
names the first option outside that set; dispatch falls back to the PyTorch chunked form for it.

Split of work: PyTorch computes the parallel, chunk-local parts (feature maps phi, and the gate
coefficients of every chunk, `chunked.coefficients.gd_coefficients`); the kernels run the
sequential part, the state recurrence over chunks, forward and backward (linear.py +
linear_kernels.py, mlp.py + mlp_kernels.py). Autograd carries the kernels' coefficient and feature
gradients back to the gates, the feature coefficients `a` and q, k.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from kernels.triton_support import (DeviceLimits, LaunchConfig, device_limits, device_reason, next_pow2,
                                    shared_memory_reason)

from ..features import feature_dim, poly_features
from ..inputs import Prepared, finish, pad_tokens, prepare
from ..types import Gates, MemoryConfig, MemoryState
from .common import CHUNKS, INPUT_DTYPES, GdCoefficients, feature_dtype, gd_coefficients_flat
from .linear import LinearGd, linear_gd_fwd, linear_launch_configs, linear_meta
from .mlp import MlpGd, mlp_launch_configs, mlp_meta, mlp_unsupported_reason

MAX_FEATURE_BLOCK = 128
KINDS = ("linear", "mlp")


def unsupported_reason(cfg: MemoryConfig, q: torch.Tensor, d_v: Optional[int] = None) -> Optional[str]:
    """None when impl="triton" covers `cfg` for inputs like q [B, T, H, d_k] and values of width d_v
    (default d_k) on q's device; else the option at fault."""
    device = device_reason(linear_gd_fwd, q)
    if device is not None:
        return device
    return coverage_reason(cfg, q.shape[-1], q.shape[-1] if d_v is None else d_v, q.dtype,
                           device_limits(q.device) if q.is_cuda else None)


def coverage_reason(cfg: MemoryConfig, d_k: int, d_v: int, dtype: torch.dtype,
                    limits: Optional[DeviceLimits]) -> Optional[str]:
    """None when the kernels cover `cfg` for key width d_k, value width d_v and inputs of `dtype`
    on a device with `limits` (None: not checked, e.g. the CPU interpreter); else the reason."""
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
    if dtype not in INPUT_DTYPES:
        return f"input dtype {dtype} (Triton covers {', '.join(map(str, INPUT_DTYPES))})"
    width = feature_dim(d_k, cfg.degree)
    if next_pow2(width) > MAX_FEATURE_BLOCK:
        return (f"feature width D={width} (d_k={d_k}, degree={cfg.degree}); "
                f"Triton keeps the state in registers and covers D <= {MAX_FEATURE_BLOCK}")
    if cfg.kind == "mlp" and cfg.anchor:
        return ("anchor=True with kind='mlp' (the MLP kernels retain towards zero: anchor=False, or the "
                "chunked path)")
    if cfg.kind == "mlp":
        reason = mlp_unsupported_reason(cfg, width, d_v, dtype)
        if reason is not None:
            return reason
    return None if limits is None else device_fit_reason(cfg, width, d_v, dtype, limits)


def launch_configs(cfg: MemoryConfig, width: int, d_v: int, dtype: torch.dtype) -> List[LaunchConfig]:
    """The compiled variants (forward with and without saving, backward) a call would launch."""
    if cfg.kind == "linear":
        return linear_launch_configs(dtype, linear_meta(cfg, width, dtype))
    return mlp_launch_configs(dtype, mlp_meta(cfg, width, d_v, dtype))


def device_fit_reason(cfg: MemoryConfig, width: int, d_v: int, dtype: torch.dtype,
                      limits: DeviceLimits) -> Optional[str]:
    """None when the variants a call would launch fit the device's shared memory (each compiled
    ahead of time once, for its compute capability), else which does not."""
    return shared_memory_reason(launch_configs(cfg, width, d_v, dtype), limits)


def _flat(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, H, ...] -> contiguous [B*H, ...] in `dtype` (the kernels' layout)."""
    return x.to(dtype).flatten(0, 1).contiguous()


def _run_linear(prep: Prepared, cfg: MemoryConfig, q: torch.Tensor, x: torch.Tensor,
                values: torch.Tensor, coef: GdCoefficients):
    meta = linear_meta(cfg, q.shape[-1], values.dtype)
    y, w, s = LinearGd.apply(q, x, values, *coef, _flat(prep.state.weights["W"]),
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
        from ..chunked import memory_forward_chunked
        return memory_forward_chunked(q, k, v, gates, params, cfg, state)
    chunk, window = cfg.chunk, cfg.window
    pad = -length % chunk
    # padding tokens: retention and momentum 1, learning rate and window gate 0, so they touch no
    # state; the chunk-end coefficients are read at the last real token anyway.
    coef = gd_coefficients_flat(pad_tokens(prep.alpha, pad, 1.0), pad_tokens(prep.eta, pad, 0.0),
                                None if prep.theta is None else pad_tokens(prep.theta, pad, 1.0),
                                pad_tokens(prep.g_win, pad, 0.0), chunk, window, length)
    mlp_residual = cfg.kind == "mlp" and prep.residual
    # an MLP memory's key residual enters only the l2 error: E = r_k + A W1^T - V
    values = prep.v_win - prep.k_win if mlp_residual and cfg.loss == "l2" else prep.v_win
    q_lifted, k_lifted = poly_features(prep.q, prep.a, cfg.degree), poly_features(prep.k_win, prep.a, cfg.degree)
    anchor = None if prep.anchor is None else prep.anchor["W"]
    if anchor is not None:
        # anchored retention of a linear memory, exactly, on the kernels' rule: they run the
        # deviation U = W - W0 (retained towards zero), whose l2 error is U k - (v - W0 k)
        prep.state.weights = {"W": prep.state.weights["W"] - anchor}
        if cfg.loss == "l2":
            values = values - k_lifted @ anchor.mT
    run = _run_linear if cfg.kind == "linear" else _run_mlp
    lifted = feature_dtype(q.dtype, cfg.degree)
    y, weights, momentum = run(
        prep, cfg, _flat(pad_tokens(q_lifted, pad, 0.0), lifted), _flat(pad_tokens(k_lifted, pad, 0.0), lifted),
        _flat(pad_tokens(values, pad, 0.0), q.dtype), coef)
    y = y.unflatten(0, (batch, heads))[:, :, :length]
    unflat = lambda tensors: {n: t.unflatten(0, (batch, heads)) for n, t in tensors.items()}  # noqa: E731
    weights = unflat(weights)
    if anchor is not None:
        y = y + q_lifted @ anchor.mT
        weights["W"] = weights["W"] + anchor
    if mlp_residual:
        y = y + prep.q
    return finish(prep, y, weights, unflat(momentum), cfg)
