"""The ground truth: the memory update as a token loop, inner gradients by autograd.

Written to read like DESIGN section 2 line by line and to share no gradient algebra with the
chunked form (whose hand-derived factors it therefore checks). Slow; for tests and benchmarks.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from kernels.newton_schulz import newton_schulz

from .features import poly_features
from .inputs import Prepared, finish, prepare, retain
from .memory_function import inner_loss, matmul_linear, memory_apply, normalised_momentum
from .types import Gates, MemoryConfig, MemoryState


def _omega_surprise(cfg: MemoryConfig, prep: Prepared, weights: Dict[str, torch.Tensor],
                    window: slice, differentiable: bool) -> Dict[str, torch.Tensor]:
    """U = sum over the window of g_i * grad_W l_i(weights)."""
    k, v, g = prep.k_win[:, :, window], prep.v_win[:, :, window], prep.g_win[:, :, window]
    with torch.enable_grad():
        leaves = {n: w if w.requires_grad else w.detach().requires_grad_() for n, w in weights.items()}
        residual = k if prep.residual else torch.zeros_like(v)
        prediction = memory_apply(cfg.kind, matmul_linear(leaves), poly_features(k, prep.a, cfg.degree),
                                  residual)
        total = (inner_loss(cfg.loss, prediction, v) * g).sum()
        grads = torch.autograd.grad(total, list(leaves.values()), create_graph=differentiable)
    return dict(zip(leaves, grads))


def memory_forward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: Gates,
                             params: Dict[str, torch.Tensor], cfg: MemoryConfig,
                             state: Optional[MemoryState] = None
                             ) -> Tuple[torch.Tensor, MemoryState]:
    prep = prepare(q, k, v, gates, params, cfg, state)
    differentiable = torch.is_grad_enabled()
    weights = dict(prep.state.weights)
    momentum = dict(prep.state.momentum)
    block, block_tokens = dict(prep.state.block), prep.state.block_tokens
    outputs = []
    for t in range(prep.length):
        if t % cfg.chunk == 0:
            chunk_start = weights  # every gradient in this chunk is taken here
        # window coordinates: token t sits at t + c - 1, its window is [t, t + c)
        surprise = _omega_surprise(cfg, prep, chunk_start, slice(t, t + cfg.window), differentiable)
        alpha = prep.alpha[:, :, t, None, None]
        eta = prep.eta[:, :, t, None, None]
        theta = None if prep.theta is None else prep.theta[:, :, t, None, None]
        weights, momentum = dict(weights), dict(momentum)
        if cfg.rule == "muon_block":
            block_tokens += 1
            block_ends = block_tokens == cfg.ns_block
            block["lr"] = alpha * block["lr"] + eta
        for name, u in surprise.items():
            step = eta * u if cfg.rule == "gd" else u
            momentum[name] = step if theta is None else theta * momentum[name] + step
            anchor = None if prep.anchor is None else prep.anchor[name]
            kept = retain(alpha, weights[name], anchor)
            if cfg.rule == "gd":
                weights[name] = kept - momentum[name]
            elif cfg.rule == "muon":
                weights[name] = kept - eta * newton_schulz(momentum[name], cfg.ns_steps)
            else:   # muon_block: normalised momentum steps; at a block's end, one orthogonal step
                weights[name] = kept - eta * normalised_momentum(momentum[name])
                block[f"start.{name}"] = retain(alpha, block[f"start.{name}"], anchor)
                if block_ends:   # what the block's steps moved, orthogonalised, at their summed lr
                    update = block[f"start.{name}"] - weights[name]
                    weights[name] = block[f"start.{name}"] - block["lr"] * newton_schulz(update, cfg.ns_steps)
        if cfg.rule == "muon_block" and block_ends:
            block = {**{f"start.{n}": w for n, w in weights.items()}, "lr": torch.zeros_like(block["lr"])}
            block_tokens = 0
        q_t = prep.q[:, :, t:t + 1]
        residual = q_t if prep.residual else 0.0
        outputs.append(memory_apply(cfg.kind, matmul_linear(weights),
                                    poly_features(q_t, prep.a, cfg.degree), residual))
    y = torch.cat(outputs, dim=2) if outputs else prep.q.new_zeros(*prep.q.shape[:3], v.shape[-1])
    return finish(prep, y, weights, momentum, cfg, block if cfg.rule == "muon_block" else None)
