"""Random inputs for memory-operator tests: normalised q, k, gates in (0, 1), small initial weights."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from kernels.memory import Gates, MemoryConfig, feature_dim


def make_inputs(cfg: MemoryConfig, batch: int = 2, length: int = 11, heads: int = 2, d_k: int = 4,
                d_v: int = 4, d_hidden: int = 6, momentum: bool = True, seed: int = 0,
                dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                             Gates, Dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def uniform(low, high):
        return (low + (high - low) * torch.rand(batch, length, heads, generator=gen, dtype=dtype))

    q = torch.nn.functional.normalize(randn(batch, length, heads, d_k), dim=-1)
    k = torch.nn.functional.normalize(randn(batch, length, heads, d_k), dim=-1)
    v = randn(batch, length, heads, d_v)
    gates = Gates(alpha=uniform(0.8, 1.0), eta=uniform(0.05, 0.3),
                  theta=uniform(0.3, 0.9) if momentum else None, g=uniform(0.2, 1.0))
    width = feature_dim(d_k, cfg.degree)
    if cfg.kind == "linear":
        params = {"W": 0.3 * randn(heads, d_v, width)}
    else:
        params = {"W1": 0.3 * randn(heads, d_v, d_hidden), "W2": 0.3 * randn(heads, d_hidden, width)}
        if cfg.kind == "gated_mlp":
            params["W3"] = 0.3 * randn(heads, d_hidden, width)
    if cfg.degree > 1:
        params["a"] = 0.5 + torch.rand(cfg.degree + 1, generator=gen, dtype=dtype)
    return q, k, v, gates, params


def leaves(q, k, v, gates: Gates, params) -> List[torch.Tensor]:
    """Every differentiable input, marked as requiring grad."""
    tensors = [q, k, v, *[g for g in gates if g is not None], *params.values()]
    for t in tensors:
        t.requires_grad_(True)
    return tensors


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
