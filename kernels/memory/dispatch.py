"""`memory_forward`: picks an implementation; all of them share one signature and semantics."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .chunked import memory_forward_chunked
from .reference import memory_forward_reference
from .types import Gates, MemoryConfig, MemoryState

IMPLEMENTATIONS = {"reference": memory_forward_reference, "chunked": memory_forward_chunked}


def resolve_impl(impl: str, q: torch.Tensor, cfg: MemoryConfig) -> str:
    """The implementation `impl` stands for; "auto" is the fastest one that covers `cfg` on q's device."""
    if impl == "auto":
        return "chunked"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}; available: auto, {', '.join(IMPLEMENTATIONS)}")
    return impl


def memory_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: Gates,
                   params: Dict[str, torch.Tensor], cfg: MemoryConfig,
                   state: Optional[MemoryState] = None, impl: str = "auto"
                   ) -> Tuple[torch.Tensor, MemoryState]:
    """Run the memory over q, k [B, T, H, d_k], v [B, T, H, d_v]; returns y [B, T, H, d_v] and the state."""
    return IMPLEMENTATIONS[resolve_impl(impl, q, cfg)](q, k, v, gates, params, cfg, state)
