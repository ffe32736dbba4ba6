"""`newton_schulz_auto`: the Triton kernel for CUDA tensors it covers, the PyTorch reference otherwise.

Triton is imported only when a CUDA tensor arrives, so CPU-only runs never load it.
"""
from __future__ import annotations

import torch

from .reference import newton_schulz


def newton_schulz_auto(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """Same signature and result as `newton_schulz`; picks the implementation by device and shape."""
    if matrix.is_cuda and matrix.dim() >= 2:
        from .triton_ns import newton_schulz_auto as triton_or_reference
        return triton_or_reference(matrix, steps)
    return newton_schulz(matrix, steps)
