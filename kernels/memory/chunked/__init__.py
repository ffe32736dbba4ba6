"""impl="chunked": the dual form in PyTorch, every kind, rule, loss, window and degree.

`gd` on linear and mlp memories runs as one autograd Function over all chunks (gd.py ->
gd_recurrence.py); everything else runs the autograd chunk loop (loop.py). Both read the gate
coefficients from coefficients.py.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..inputs import finish, prepare
from ..types import Gates, MemoryConfig, MemoryState
from .gd import KINDS as GD_KINDS, gd_chunked
from .loop import chunk_loop


def memory_forward_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: Gates,
                           params: Dict[str, torch.Tensor], cfg: MemoryConfig,
                           state: Optional[MemoryState] = None
                           ) -> Tuple[torch.Tensor, MemoryState]:
    prep = prepare(q, k, v, gates, params, cfg, state)
    if cfg.rule == "gd" and cfg.kind in GD_KINDS and prep.length > 0:
        return finish(prep, *gd_chunked(prep, cfg), cfg)
    y, weights, momentum, block = chunk_loop(prep, cfg)
    return finish(prep, y, weights, momentum, cfg, block)
