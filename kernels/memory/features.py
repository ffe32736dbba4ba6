"""Polynomial feature map phi with phi(x) . phi(y) = sum_i a_i (x . y)^i (ATLAS section 3.1).

Degree 1 is the identity (D = d, `a` unused). For p > 1 the layout is the symmetric-monomial
compression of concat_i sqrt(a_i) x^{(x)i}: each multiset of indices appears once, scaled by the
square root of its multinomial coefficient, so D = C(d + p, p) instead of sum_i d^i.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import List, Tuple

import torch


def feature_dim(d: int, degree: int) -> int:
    """D, the width of phi(x) for x of width d."""
    return d if degree == 1 else math.comb(d + degree, degree)


@lru_cache(maxsize=None)
def _monomials(d: int, degree: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index tuples i_1 <= ... <= i_degree and sqrt(multinomial) weights for one degree."""
    index, weight = [], []
    for combo in itertools.combinations_with_replacement(range(d), degree):
        counts = [combo.count(i) for i in set(combo)]
        multinomial = math.factorial(degree) // math.prod(math.factorial(c) for c in counts)
        index.append(combo)
        weight.append(math.sqrt(multinomial))
    # explicit device: the cache must not capture a tensor made under a `torch.device("meta")` context
    return (torch.tensor(index, dtype=torch.long, device="cpu"),
            torch.tensor(weight, dtype=torch.float64, device="cpu"))


@lru_cache(maxsize=64)
def _monomials_on(d: int, degree: int, device: torch.device, dtype: torch.dtype
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """_monomials on `device`, made once: a per-call copy of the index to a GPU is a blocking
    host-to-device transfer (once per chunk on the muon path)."""
    index, weight = _monomials(d, degree)
    return index.to(device), weight.to(device, dtype)


def poly_features(x: torch.Tensor, a: torch.Tensor, degree: int) -> torch.Tensor:
    """phi(x) for x [..., d]; `a` [degree + 1] holds the non-negative coefficients."""
    if degree == 1:
        return x
    d = x.shape[-1]
    parts: List[torch.Tensor] = [a[0].sqrt().to(x.dtype).expand(*x.shape[:-1], 1)]
    for i in range(1, degree + 1):
        if i == 1:
            monomial = x
        else:
            index, weight = _monomials_on(d, i, x.device, x.dtype)
            monomial = x[..., index].prod(dim=-1) * weight
        parts.append(a[i].sqrt().to(x.dtype) * monomial)
    return torch.cat(parts, dim=-1)


def poly_kernel(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, degree: int) -> torch.Tensor:
    """phi(x) phi(y)^T computed on the unlifted inputs: x [..., n, d], y [..., m, d] -> [..., n, m]."""
    dots = x @ y.mT
    if degree == 1:
        return dots
    out = a[degree].to(dots.dtype)
    for i in range(degree - 1, -1, -1):  # Horner: a_0 + s (a_1 + s (a_2 + ...))
        out = a[i].to(dots.dtype) + dots * out
    return out
