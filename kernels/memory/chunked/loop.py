"""The autograd chunk loop: every kind, rule and loss, differentiated by autograd chunk by chunk.

`gd` on linear and mlp memories has a faster home (gd.py: one autograd Function over all chunks);
this loop covers the rest: `gated_mlp` under `gd`, and the `muon` rule, which orthogonalises every
token's momentum (non-linear), so S_t and W_t are materialised per token from the same gate
products (coefficients.py).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from kernels.newton_schulz import newton_schulz_auto  # Triton kernel on CUDA, PyTorch elsewhere
from kernels.precision import backward_without_autocast

from ..features import poly_features, poly_kernel
from ..inputs import Prepared
from ..memory_function import gradient_factors, memory_apply
from ..types import FIRST_LAYER, MemoryConfig
from .coefficients import ChunkCoefficients, GdCoefficients, chunk_coefficients, gd_coefficients
from .cpu_threads import run_all
from .muon_block import muon_block_chunk

Factors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]
Anchor = Optional[Dict[str, torch.Tensor]]   # W0 per weight when retention is anchored


def _plus_outer_sum(base: Optional[torch.Tensor], coefficient: torch.Tensor,
                    factors: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """base + sum_j coefficient[..., j] delta_j x_j^T for delta [.., N, out], x [.., N, in].

    Accumulates in place into the matmul's fresh output (autograd needs neither): state-sized
    temporaries dominate the memory traffic of the chunk loop.
    """
    delta, inputs = factors
    out = (delta * coefficient.unsqueeze(-1)).mT @ inputs
    return out if base is None else out.add_(base)


def _anchor_read(anchor: Anchor, name: str, retain: torch.Tensor, x: torch.Tensor):
    """(1 - A_t) x W0^T: what anchored retention gives back of the initial weights (0 without)."""
    return 0.0 if anchor is None else (1.0 - retain) * (x @ anchor[name].mT)


def _anchor_end(anchor: Anchor, name: str, retain: torch.Tensor):
    """(1 - A) W0 at a chunk's end (0 without an anchor); retain [..., 1, 1]."""
    return 0.0 if anchor is None else (1.0 - retain) * anchor[name]


def _gd_chunk(cfg: MemoryConfig, coef: GdCoefficients, factors: Factors,
              weights: Dict[str, torch.Tensor], momentum: Dict[str, torch.Tensor],
              first_kernel: torch.Tensor, u_q: torch.Tensor, residual, anchor: Anchor = None):
    """Outputs and chunk-end state for the `gd` rule, without per-token weights (one chunk:
    coefficient tensors [B, H, b, ...], ends [B, H, 3])."""
    retain = coef.retain.unsqueeze(-1)
    carry = None if coef.carry is None else coef.carry.unsqueeze(-1)

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        delta, inputs = factors[name]
        kernel = first_kernel if name in FIRST_LAYER else x @ inputs.mT
        out = retain * (x @ weights[name].mT) - (coef.mixing * kernel) @ delta + _anchor_read(anchor, name, retain, x)
        if carry is not None:
            out = out - carry * (x @ momentum[name].mT)
        return out

    y = memory_apply(cfg.kind, linear, u_q, residual)
    end_retain, end_carry, end_momentum = (coef.ends[..., i, None, None] for i in range(3))
    new_weights, new_momentum = {}, {}
    for name in factors:
        base_w, base_s = end_retain * weights[name] + _anchor_end(anchor, name, end_retain), None
        if carry is not None:   # in place on fresh products, which autograd does not keep
            base_w = base_w.addcmul_(end_carry, momentum[name], value=-1.0)
            base_s = end_momentum * momentum[name]
        new_weights[name] = _plus_outer_sum(base_w, -coef.end_mixing, factors[name])
        new_momentum[name] = _plus_outer_sum(base_s, coef.end_momentum, factors[name])
    return y, new_weights, new_momentum


def _muon_chunk(cfg: MemoryConfig, coef: ChunkCoefficients, eta: torch.Tensor,
                factors: Factors, weights: Dict[str, torch.Tensor], momentum: Dict[str, torch.Tensor],
                u_q: torch.Tensor, residual, anchor: Anchor = None):
    """Outputs and chunk-end state for the `muon` rule: NS on every token's momentum."""
    momentum_mixing = coef.momentum_pairs @ coef.window            # S_t from S_s and the factors
    weight_mixing = coef.retain_pairs * eta.unsqueeze(-2)          # W_t from W_s and NS(S_m), m <= t
    per_token = {}
    new_weights, new_momentum = {}, {}
    for name, (delta, inputs) in factors.items():
        # S_t = P_t S_s + sum_j mixing[t, j] delta_j x_j^T, as one matmul over flattened outer products
        outer = (delta.unsqueeze(-1) * inputs.unsqueeze(-2)).flatten(-2)
        steps = (momentum_mixing @ outer).unflatten(-1, delta.shape[-1:] + inputs.shape[-1:])
        if coef.momentum_carry is not None:
            steps = steps + coef.momentum_carry[..., None, None] * momentum[name].unsqueeze(2)
        orthogonal = newton_schulz_auto(steps, cfg.ns_steps)
        shape = orthogonal.shape
        w_t = (coef.retain[..., None, None] * weights[name].unsqueeze(2)
               - (weight_mixing @ orthogonal.flatten(-2)).view(shape))
        if anchor is not None:
            w_t = w_t + (1.0 - coef.retain[..., None, None]) * anchor[name].unsqueeze(2)
        per_token[name] = w_t
        # copies: a slice would keep every token's weights alive as the next chunk's start state
        new_weights[name], new_momentum[name] = w_t[:, :, -1].clone(), steps[:, :, -1].clone()

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        return (per_token[name] @ x.unsqueeze(-1)).squeeze(-1)

    return memory_apply(cfg.kind, linear, u_q, residual), new_weights, new_momentum


class _ChunkInputs(NamedTuple):
    """One chunk's slices of the prepared inputs (window tensors with their c-1 predecessors)."""

    q: torch.Tensor
    k_win: torch.Tensor
    v_win: torch.Tensor
    g_win: torch.Tensor
    alpha: torch.Tensor
    eta: torch.Tensor
    theta: Optional[torch.Tensor]


def state_keys(cfg: MemoryConfig) -> Tuple[str, ...]:
    """The flat names of the state a chunk step carries: "weights.W", "momentum.W", under
    muon_block the open block's "start.W" and "lr", and with anchored retention "anchor.W" (W0,
    carried unchanged, so its gradient gathers over the chunks)."""
    names = cfg.weight_names
    keys = tuple(f"weights.{n}" for n in names) + tuple(f"momentum.{n}" for n in names)
    if cfg.rule == "muon_block":
        keys += tuple(f"start.{n}" for n in names) + ("lr",)
    if cfg.anchor:
        keys += tuple(f"anchor.{n}" for n in names)
    return keys


def _chunk_step(cfg: MemoryConfig, residual: bool, a: Optional[torch.Tensor], x: _ChunkInputs,
                state: Dict[str, torch.Tensor], block_tokens: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """y of one chunk [B, H, L, d_v] and its end state, differentiable by autograd."""
    names = cfg.weight_names
    weights = {n: state[f"weights.{n}"] for n in names}
    momentum = {n: state[f"momentum.{n}"] for n in names}
    anchor = {n: state[f"anchor.{n}"] for n in names} if cfg.anchor else None
    factors = gradient_factors(cfg.kind, cfg.loss, weights, poly_features(x.k_win, a, cfg.degree),
                               x.k_win if residual else torch.zeros_like(x.v_win), x.v_win)
    u_q = poly_features(x.q, a, cfg.degree)
    read_residual = x.q if residual else 0.0
    if cfg.rule == "muon_block" and cfg.ns_block > 1:
        return muon_block_chunk(cfg, factors, poly_kernel(x.q, x.k_win, a, cfg.degree), u_q, read_residual,
                                x.alpha, x.eta, x.theta, x.g_win, state, block_tokens, anchor)
    if cfg.rule == "gd":   # (the muon branch below also serves muon_block at ns_block 1)
        one = lambda t: None if t is None else t.unsqueeze(2)  # noqa: E731  (a chunk axis of 1)
        coef = GdCoefficients(*(None if t is None else t.squeeze(2) for t in gd_coefficients(
            one(x.alpha), one(x.eta), one(x.theta), one(x.g_win), cfg.window)))
        first_kernel = poly_kernel(x.q, x.k_win, a, cfg.degree)
        y, weights, momentum = _gd_chunk(cfg, coef, factors, weights, momentum, first_kernel, u_q, read_residual,
                                         anchor)
    else:
        coef = chunk_coefficients(x.alpha, x.theta, x.g_win, cfg.window)
        y, weights, momentum = _muon_chunk(cfg, coef, x.eta, factors, weights, momentum, u_q, read_residual,
                                           anchor)
    end = {**{f"weights.{n}": w for n, w in weights.items()}, **{f"momentum.{n}": m for n, m in momentum.items()}}
    if cfg.rule == "muon_block":   # ns_block 1 is muon itself: every token closes its own block
        end.update({f"start.{n}": w for n, w in weights.items()})
        end["lr"] = torch.zeros_like(state["lr"])
    if anchor is not None:
        end.update({f"anchor.{n}": w for n, w in anchor.items()})
    return y, end


def _chunk_slices(inputs: _ChunkInputs, start: int, stop: int, window: int) -> _ChunkInputs:
    """Tokens start..stop-1 (window tensors: from start, with the c-1 before them)."""
    token = lambda t: None if t is None else t[:, :, start:stop]  # noqa: E731
    win = lambda t: t[:, :, start:stop + window - 1]  # noqa: E731
    return _ChunkInputs(token(inputs.q), win(inputs.k_win), win(inputs.v_win), win(inputs.g_win),
                        token(inputs.alpha), token(inputs.eta), token(inputs.theta))


def _bounds(length: int, size: int) -> List[Tuple[int, int]]:
    return [(start, min(start + size, length)) for start in range(0, length, size)]


class ChunkLoop(torch.autograd.Function):
    """forward(cfg, residual, block_tokens, a, q, k_win, v_win, g_win, alpha, eta, theta, *state)
    -> (y [B, H, T, d_v], *final state), the state in `state_keys(cfg)` order.

    Checkpointed by chunk: the forward keeps only each chunk's start state (through
    save_for_backward), and the backward recomputes one chunk at a time with autograd, from its
    start state, and carries the state's gradient to the chunk before. Saved memory is one state
    per chunk, whatever the rule materialises inside a chunk (the `muon` rule: every token's
    weights, momenta and Newton-Schulz iterates). Both directions run on a flushing worker thread
    (cpu_threads.py) on CPU.
    """

    @staticmethod
    def forward(ctx, cfg: MemoryConfig, residual: bool, block_tokens: int, a: Optional[torch.Tensor],
                q, k_win, v_win, g_win, alpha, eta, theta, *state: torch.Tensor):
        inputs = _ChunkInputs(q, k_win, v_win, g_win, alpha, eta, theta)
        keys = state_keys(cfg)

        def run():
            current, starts, outputs = dict(zip(keys, state)), [], []
            for start, stop in _bounds(q.shape[2], cfg.chunk):
                starts += [current[k] for k in keys]
                y, current = _chunk_step(cfg, residual, a, _chunk_slices(inputs, start, stop, cfg.window), current,
                                         (block_tokens + start) % cfg.ns_block)
                outputs.append(y)
            return torch.cat(outputs, dim=2), [current[k] for k in keys], starts

        (y, final, starts), = run_all([run], q.device)
        ctx.cfg, ctx.residual, ctx.block_tokens = cfg, residual, block_tokens
        ctx.save_for_backward(a, q, k_win, v_win, g_win, alpha, eta, theta, *starts)
        return (y, *final)

    @staticmethod
    @once_differentiable
    @backward_without_autocast
    def backward(ctx, dy: torch.Tensor, *d_final: torch.Tensor):
        cfg, residual = ctx.cfg, ctx.residual
        a, q, k_win, v_win, g_win, alpha, eta, theta, *starts = ctx.saved_tensors
        inputs = _ChunkInputs(q, k_win, v_win, g_win, alpha, eta, theta)
        keys = state_keys(cfg)
        width = len(keys)

        def run():
            grads = _ChunkInputs(*(None if t is None else torch.zeros_like(t) for t in inputs))
            d_a = None if a is None else torch.zeros_like(a)
            d_state = list(d_final)
            chunks = _bounds(q.shape[2], cfg.chunk)
            for n in range(len(chunks) - 1, -1, -1):
                start, stop = chunks[n]
                with torch.enable_grad():
                    state = [t.detach().requires_grad_() for t in starts[n * width:(n + 1) * width]]
                    piece = _ChunkInputs(*(None if t is None else t.detach().requires_grad_()
                                           for t in _chunk_slices(inputs, start, stop, cfg.window)))
                    leaf_a = None if a is None else a.detach().requires_grad_()
                    y, end = _chunk_step(cfg, residual, leaf_a, piece, dict(zip(keys, state)),
                                         (ctx.block_tokens + start) % cfg.ns_block)
                    # a block's sum restarts at zero at its end: such outputs carry no gradient
                    pairs = [(out, grad) for out, grad in zip([y] + [end[k] for k in keys],
                                                              [dy[:, :, start:stop]] + d_state) if out.requires_grad]
                    leaves = state + [t for t in piece if t is not None] + ([leaf_a] if leaf_a is not None else [])
                    got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
                got = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(got, leaves)]
                d_state, rest = got[:width], iter(got[width:])
                window = (start, stop + cfg.window - 1)
                for whole, part, (lo, hi) in zip(grads, piece, ((start, stop), window, window, window,
                                                                (start, stop), (start, stop), (start, stop))):
                    if part is not None:
                        whole[:, :, lo:hi] += next(rest)
                if d_a is not None:
                    d_a += next(rest)
            return grads, d_a, d_state

        (grads, d_a, d_start), = run_all([run], dy.device)
        return (None, None, None, d_a, *grads, *d_start)


def chunk_loop(prep: Prepared, cfg: MemoryConfig):
    """Outputs y [B, H, T, d_v], the final weights and momentum, and the open muon_block block
    (None for other rules), chunk by chunk (ChunkLoop)."""
    keys = state_keys(cfg)
    known = {**{f"weights.{n}": w for n, w in prep.state.weights.items()},
             **{f"momentum.{n}": m for n, m in prep.state.momentum.items()}, **prep.state.block,
             **({} if prep.anchor is None else {f"anchor.{n}": w for n, w in prep.anchor.items()})}
    if prep.length == 0:
        final = [known[k] for k in keys]
        y = prep.q.new_zeros(*prep.q.shape[:3], prep.v_win.shape[-1])
    else:
        y, *final = ChunkLoop.apply(cfg, prep.residual, prep.state.block_tokens, prep.a, prep.q, prep.k_win,
                                    prep.v_win, prep.g_win, prep.alpha, prep.eta, prep.theta, *[known[k] for k in keys])
    out = dict(zip(keys, final))
    weights = {n: out[f"weights.{n}"] for n in cfg.weight_names}
    momentum = {n: out[f"momentum.{n}"] for n in cfg.weight_names}
    block = {k: v for k, v in out.items() if k.startswith(("start.", "lr"))}
    return y, weights, momentum, (block if cfg.rule == "muon_block" else None)
