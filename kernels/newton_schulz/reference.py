"""PyTorch Newton-Schulz: batched over leading dimensions, run in at least fp32.

Each step maps X -> a X + (b A + c A^2) X with A = X X^T, which pushes the singular values of the
Frobenius-normalised input towards ~1 (roughly into [0.7, 1.2]), approximating U V^T of its SVD.
"""
from __future__ import annotations

import torch

from kernels.precision import autocast_off

# Muon's quintic coefficients (Jordan et al., 2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_NORM_FLOOR = 1e-7


def newton_schulz(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """Orthogonalise each matrix in `matrix` ([..., m, n]); 1-D inputs (vectors) pass unchanged."""
    if matrix.dim() < 2:
        return matrix
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation so X X^T is the smaller Gram matrix
        x = x.mT
    with autocast_off(x.device):   # "at least fp32" holds under a caller's autocast too
        x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp_min(_NORM_FLOOR)
        for _ in range(steps):
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(matrix.dtype)
