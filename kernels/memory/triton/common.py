"""What the Triton memory paths (linear and MLP, `gd` rule) share on the PyTorch side: the gate
coefficients of every chunk in the kernels' layout, folding per-chunk window gradients, kernel
signatures."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as F

from kernels.triton_support import TRITON_DTYPES

from ..chunked.coefficients import GdCoefficients, gd_coefficients
from ..inputs import split_chunks

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


def gd_coefficients_flat(alpha: torch.Tensor, eta: torch.Tensor, theta: Optional[torch.Tensor],
                         g_win: torch.Tensor, chunk: int, window: int, length: int) -> GdCoefficients:
    """The `gd` coefficients of every chunk (alpha, eta, theta [B, H, T_pad], g_win [B, H, T_pad+c-1])
    in the kernels' layout: flattened over (batch, head), contiguous fp32, carry zero without momentum."""
    split = lambda x: None if x is None else split_chunks(x, chunk)  # noqa: E731
    coef = gd_coefficients(split(alpha), split(eta), split(theta), split_chunks(g_win, chunk, window),
                           window, (length - 1) % chunk)
    if coef.carry is None:
        coef = coef._replace(carry=torch.zeros_like(coef.retain))
    return GdCoefficients(*(x.to(torch.float32).flatten(0, 1).contiguous() for x in coef))


def fold_windows(per_chunk: torch.Tensor, chunk: int, window: int) -> torch.Tensor:
    """[.., NC, b+c-1, F] per-chunk window rows -> [.., NC*b + c-1, F], summing rows two chunks share."""
    n_chunks = per_chunk.shape[-3]
    out = F.pad(per_chunk[..., :chunk, :].flatten(-3, -2), (0, 0, 0, chunk))
    if window > 1:   # chunk n's rows b.. sit where chunk n+1's first c-1 rows sit
        tail = F.pad(per_chunk[..., chunk:, :], (0, 0, 0, chunk - (window - 1))).flatten(-3, -2)
        out = out + F.pad(tail, (0, 0, chunk, 0))
    return out[..., :n_chunks * chunk + window - 1, :]
