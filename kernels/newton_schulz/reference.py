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


def gram_form_is_cheaper(rows: int, cols: int, steps: int) -> bool:
    """For a wide [rows, cols] matrix: whether iterating on G = X X^T (and applying the product of
    the step polynomials to X once) costs fewer FLOPs than iterating on X.

    Iterating on X: steps * (4 m^2 n + 2 m^3). On G: 4 m^2 n (form G, apply once) + 8 m^3 per step
    (G^2 for the polynomial P, then G <- P (P G) and Q <- P Q; P commutes with G)."""
    m, n = rows, cols
    return 4 * m * m * n + 8 * steps * m ** 3 < steps * (4 * m * m * n + 2 * m ** 3)


def _iterate_on_x(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def _iterate_on_gram(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The same iterates: X_{k+1} = P_k X_k with P_k = a + b G_k + c G_k^2 and G_{k+1} = P_k^2 G_k."""
    a, b, c = NS_COEFFICIENTS
    gram = x @ x.mT
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    product = None
    for step in range(steps):
        poly = a * eye + b * gram + c * gram @ gram
        product = poly if product is None else poly @ product
        if step + 1 < steps:
            gram = poly @ (poly @ gram)
    return x if product is None else product @ x


def newton_schulz(matrix: torch.Tensor, steps: int, gram: bool | None = None) -> torch.Tensor:
    """Orthogonalise each matrix in `matrix` ([..., m, n]); 1-D inputs (vectors) pass unchanged.

    Runs on the short side (a tall matrix is transposed), in at least fp32; `gram=None` picks the
    cheaper of the two equal iterations by `gram_form_is_cheaper`."""
    if matrix.dim() < 2:
        return matrix
    x = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation so X X^T is the smaller Gram matrix
        x = x.mT
    if gram is None:
        gram = gram_form_is_cheaper(x.shape[-2], x.shape[-1], steps)
    with autocast_off(x.device):   # "at least fp32" holds under a caller's autocast too
        x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp_min(_NORM_FLOOR)
        x = _iterate_on_gram(x, steps) if gram else _iterate_on_x(x, steps)
    if tall:
        x = x.mT
    return x.to(matrix.dtype)
