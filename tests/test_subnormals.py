"""The memory operator produces no subnormal floats (x86 arithmetic on them is many times slower on
some CPUs, and below the smallest normal a value carries no information next to O(1) terms).

A long sequence at tiny width with trained-like gates: fast-decaying heads (alpha near 0.5), weak
momentum (theta near 0.05) and small inner learning rates drive gate products and the state itself
towards zero. Every tensor the operator saves for the backward, returns, or gives back as a
gradient is checked.
"""
from __future__ import annotations

import math

import pytest
import torch

from kernels.memory import Gates, MemoryConfig, memory_forward

from .memory_cases import make_inputs

TINY = torch.finfo(torch.float32).tiny


def _subnormals(t: torch.Tensor) -> int:
    if not t.is_floating_point():
        return 0
    magnitude = t.detach().abs()
    return int(((magnitude > 0) & (magnitude < torch.finfo(t.dtype).tiny)).sum())


def _trained_like_inputs(cfg: MemoryConfig, length: int, heads: int = 3, seed: int = 0):
    q, k, v, _, params = make_inputs(cfg, batch=1, length=length, heads=heads, d_k=4, d_v=4, d_hidden=8,
                                     seed=seed, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    rand = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    # per head: one fast-forgetting head, one slow, one in between; weak momentum, small inner lr
    alpha = torch.stack([0.45 + 0.1 * rand(1, length), 0.97 + 0.029 * rand(1, length),
                         0.8 + 0.15 * rand(1, length)], dim=-1)
    theta = 0.02 + 0.1 * rand(1, length, heads)
    eta = 1e-3 * (0.1 + rand(1, length, heads))
    g = 0.2 + 0.8 * rand(1, length, heads)
    leaves = [x.requires_grad_() for x in (q, k, v, alpha, eta, theta, g)]
    return leaves, {n: p.requires_grad_() for n, p in params.items()}


CASES = [("linear", "gd", 1, 1, 4096), ("mlp", "gd", 1, 1, 4096), ("mlp", "gd", 4, 2, 2048),
         ("gated_mlp", "gd", 2, 1, 1024), ("mlp", "muon", 2, 1, 256)]


@pytest.mark.parametrize("kind,rule,window,degree,length", CASES)
def test_no_subnormal_saved_returned_or_in_gradients(kind, rule, window, degree, length):
    cfg = MemoryConfig(kind=kind, rule=rule, window=window, degree=degree, chunk=64)
    (q, k, v, alpha, eta, theta, g), params = _trained_like_inputs(cfg, length)
    found = {}

    def pack(t):
        if _subnormals(t):
            found[f"saved {tuple(t.shape)}"] = found.get(f"saved {tuple(t.shape)}", 0) + _subnormals(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, state = memory_forward(q, k, v, Gates(alpha, eta, theta, g), params, cfg, impl="chunked")
    (y.square().sum() + sum(w.square().sum() for w in state.weights.values())).backward()
    returned = {"y": y, **{f"weights {n}": w for n, w in state.weights.items()},
                **{f"momentum {n}": s for n, s in state.momentum.items()}}
    grads = {f"grad {name}": x.grad for name, x in (("q", q), ("k", k), ("v", v), ("alpha", alpha),
                                                     ("eta", eta), ("theta", theta), ("g", g))}
    grads.update({f"grad {n}": p.grad for n, p in params.items()})
    for name, t in {**returned, **grads}.items():
        assert t is not None, name
        if _subnormals(t):
            found[name] = _subnormals(t)
    assert not found, found
    # the regime is the one meant: within one chunk the momentum products P_t fall through the
    # subnormal range (so only the flush keeps them out)
    log_p = theta.detach()[0, :cfg.chunk].log().cumsum(0)
    assert ((log_p < math.log(TINY)) & (log_p > math.log(TINY) - 20)).any()
