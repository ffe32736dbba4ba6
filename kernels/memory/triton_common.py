"""What the Triton memory paths (linear and MLP, `gd` rule) share on the PyTorch side: the gate
coefficients of every chunk, folding per-chunk window gradients, padding, kernel signatures."""
from __future__ import annotations

from typing import Dict, Iterable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from kernels.triton_support import TRITON_DTYPES

from .chunked import chunk_coefficients

CHUNKS = (16, 32, 64)
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


FEATURE_POINTERS = ("Q", "X")   # lifted queries and window keys
VALUE_POINTERS = ("V",)


def feature_dtype(input_dtype: torch.dtype, degree: int) -> torch.dtype:
    """Kernels read q, k in the input dtype, but a polynomial lift (degree > 1) in fp32: rounding
    the lifted features back to 16 bits costs several percent of accuracy on a degree-2 MLP memory."""
    return input_dtype if degree == 1 else torch.float32


def kernel_signature(pointers: Iterable[str], scalars: Iterable[str], constexprs: Iterable[str],
                     dtype: torch.dtype, fp32_features: bool) -> Dict[str, str]:
    """Triton signature: values in the input dtype, features in it too unless `fp32_features`,
    every other pointer fp32."""
    typed = {name: "*" + dtype_label(dtype) for name in VALUE_POINTERS}
    typed.update({name: "*" + dtype_label(torch.float32 if fp32_features else dtype)
                  for name in FEATURE_POINTERS})
    sig = {p: typed.get(p, "*fp32") for p in pointers}
    sig.update({s: "i32" for s in scalars})
    sig.update({c: "constexpr" for c in constexprs})
    return sig


def dtype_label(dtype: torch.dtype) -> str:
    return TRITON_DTYPES[str(dtype).removeprefix("torch.")]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
