"""`memory_forward`: picks an implementation; all of them share one signature and semantics.

impl="auto" picks "triton" for CUDA inputs whose options the Triton kernels cover
(`triton.unsupported_reason`), and "chunked" otherwise (CPU, or any uncovered option),
with no error. impl="triton" on an uncovered option raises a ValueError that names it. Triton is
imported only when a CUDA tensor or impl="triton" asks for it, so CPU-only runs never load it.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .chunked import memory_forward_chunked
from kernels.precision import autocast_dtype, autocast_off
from .reference import memory_forward_reference
from .types import Gates, MemoryConfig, MemoryState


def memory_forward_triton(q, k, v, gates, params, cfg, state=None):
    """impl="triton" (fused Triton chunk recurrence); see kernels/memory/triton/__init__.py."""
    from .triton import memory_forward_triton as run
    return run(q, k, v, gates, params, cfg, state)


IMPLEMENTATIONS = {"reference": memory_forward_reference, "chunked": memory_forward_chunked,
                   "triton": memory_forward_triton}


def triton_unsupported_reason(q: torch.Tensor, cfg: MemoryConfig, d_v: Optional[int] = None
                              ) -> Optional[str]:
    """None when impl="triton" covers `cfg` for inputs like q (values of width d_v, default d_k);
    otherwise the option it does not cover."""
    try:
        from .triton import unsupported_reason
    except ImportError as error:   # triton missing or broken: report it as the reason
        return f"triton unavailable ({error})"
    return unsupported_reason(cfg, q, d_v)


def resolve_impl(impl: str, q: torch.Tensor, cfg: MemoryConfig, d_v: Optional[int] = None) -> str:
    """The implementation `impl` stands for; "auto" is the fastest one that covers `cfg` on q's
    device, for values of width d_v (default: q's width)."""
    if impl == "auto":
        if q.is_cuda and triton_unsupported_reason(q, cfg, d_v) is None:
            return "triton"
        return "chunked"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}; available: auto, {', '.join(IMPLEMENTATIONS)}")
    if impl == "triton":
        reason = triton_unsupported_reason(q, cfg, d_v)
        if reason is not None:
            raise ValueError(f"impl='triton' does not cover {reason}; use impl='auto' or 'chunked'")
    return impl


def memory_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: Gates,
                   params: Dict[str, torch.Tensor], cfg: MemoryConfig,
                   state: Optional[MemoryState] = None, impl: str = "auto"
                   ) -> Tuple[torch.Tensor, MemoryState]:
    """Run the memory over q, k [B, T, H, d_k], v [B, T, H, d_v]; returns y [B, T, H, d_v] and the state.

    The operator decides its own precision, whatever the caller's autocast: state, gate products,
    Newton-Schulz and accumulations run in promote(input dtype, cfg.state_dtype) (fp32 by default),
    with autocast off inside (autocast would round its matmuls to 16 bits, and its in-place ops
    would mix dtypes). Under autocast the Triton kernels read q, k, v in the autocast dtype (their
    16-bit dot variants, fp32 state and accumulation); y has the dtype of the v they ran on.
    """
    model_dtype = autocast_dtype(q.device)
    if model_dtype is not None and q.dtype != model_dtype and (q.is_cuda or impl == "triton"):
        low = tuple(x.to(model_dtype) for x in (q, k, v))
        if resolve_impl(impl, low[0], cfg, v.shape[-1]) == "triton":
            q, k, v = low
    chosen = resolve_impl(impl, q, cfg, v.shape[-1])
    with autocast_off(q.device):
        return IMPLEMENTATIONS[chosen](q, k, v, gates, params, cfg, state)
