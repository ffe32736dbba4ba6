"""The `muon_block` rule: Newton-Schulz once per block of `ns_block` tokens (kernels/memory/chunked/
muon_block.py). The chunked dual form equals the token loop (outputs, every final state matrix, and
the gradients of q, k, v, every gate and every parameter), state passes across calls, and at
ns_block = 1 the rule is `muon` exactly."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from kernels.memory import Gates, MemoryConfig, memory_forward
from tests.memory_cases import leaves, make_inputs, relative_error


def _objective(y, state, seed: int = 7):
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    total = (y * probe).sum() + sum(w.sum() for w in state.weights.values())
    total = total + sum(s.pow(2).sum() for s in state.momentum.values())
    return total + sum(b.pow(2).sum() for b in state.block.values())


def _run(impl: str, cfg: MemoryConfig, inputs):
    q, k, v, gates, params = inputs
    tensors = leaves(q, k, v, gates, params)
    y, state = memory_forward(q, k, v, gates, params, cfg, impl=impl)
    return y, state, torch.autograd.grad(_objective(y, state), tensors)


def _assert_same(a, b, tol: float = 1e-8):
    (y, s, g), (y_ref, s_ref, g_ref) = a, b
    assert relative_error(y, y_ref) < tol
    for name in s_ref.weights:
        assert relative_error(s.weights[name], s_ref.weights[name]) < tol, name
        assert relative_error(s.momentum[name], s_ref.momentum[name]) < tol, name
    assert s.block.keys() == s_ref.block.keys() and s.block_tokens == s_ref.block_tokens
    for key in s_ref.block:
        assert relative_error(s.block[key], s_ref.block[key]) < tol, key
    assert len(g) == len(g_ref)
    for actual, expected in zip(g, g_ref):
        assert relative_error(actual, expected) < tol


# (ns_block, chunk): blocks inside a chunk, one block per chunk, blocks over several chunks
BLOCKS = [(2, 4), (4, 4), (8, 4), (3, 6)]
COMBOS = list(itertools.product(["linear", "mlp", "gated_mlp"], ["l2", "dot"], [1, 3], [1, 2], BLOCKS))


@pytest.mark.parametrize("kind,loss,window,degree,blocks", COMBOS)
def test_chunked_equals_reference(kind, loss, window, degree, blocks):
    ns_block, chunk = blocks
    cfg = MemoryConfig(kind, "muon_block", loss, window, chunk, degree, ns_block=ns_block)
    # T = 13: the last chunk is short and ends inside a block
    _assert_same(_run("chunked", cfg, make_inputs(cfg, length=13)), _run("reference", cfg, make_inputs(cfg, length=13)))


@pytest.mark.parametrize("kind", ["linear", "mlp", "gated_mlp"])
def test_chunked_equals_reference_with_retention_towards_zero(kind):
    cfg = MemoryConfig(kind, "muon_block", "l2", window=2, chunk=4, degree=2, ns_block=8, anchor=False)
    _assert_same(_run("chunked", cfg, make_inputs(cfg, length=13)), _run("reference", cfg, make_inputs(cfg, length=13)))


@pytest.mark.parametrize("kind", ["linear", "mlp", "gated_mlp"])
def test_chunked_equals_reference_without_momentum(kind):
    cfg = MemoryConfig(kind, "muon_block", "l2", window=2, chunk=4, degree=2, ns_block=8)
    inputs = lambda: make_inputs(cfg, length=13, momentum=False)  # noqa: E731
    _assert_same(_run("chunked", cfg, inputs()), _run("reference", cfg, inputs()))


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("kind,window,degree", [("mlp", 1, 1), ("gated_mlp", 3, 2), ("linear", 2, 1)])
def test_ns_block_one_is_muon(impl, kind, window, degree):
    block = MemoryConfig(kind, "muon_block", "l2", window, chunk=4, degree=degree, ns_block=1)
    muon = MemoryConfig(kind, "muon", "l2", window, chunk=4, degree=degree)
    results = []
    for cfg in (block, muon):
        q, k, v, gates, params = make_inputs(cfg)
        tensors = leaves(q, k, v, gates, params)
        y, state = memory_forward(q, k, v, gates, params, cfg, impl=impl)
        # the same objective for both: muon has no block state
        objective = _objective(y, dataclasses.replace(state, block={}))
        results.append((y, state, torch.autograd.grad(objective, tensors)))
    (y, s, g), (y_m, s_m, g_m) = results
    assert relative_error(y, y_m) < 1e-10 and s.block_tokens == 0
    for name in s_m.weights:
        assert relative_error(s.weights[name], s_m.weights[name]) < 1e-10
        assert relative_error(s.momentum[name], s_m.momentum[name]) < 1e-10
    for actual, expected in zip(g, g_m):
        assert relative_error(actual, expected) < 1e-10


def _two_calls(impl, cfg, inputs, at):
    q, k, v, gates, params = inputs
    tensors = leaves(q, k, v, gates, params)
    first = Gates(*[None if g is None else g[:, :at] for g in gates])
    second = Gates(*[None if g is None else g[:, at:] for g in gates])
    y1, state = memory_forward(q[:, :at], k[:, :at], v[:, :at], first, params, cfg, impl=impl)
    y2, end = memory_forward(q[:, at:], k[:, at:], v[:, at:], second, params, cfg, state=state, impl=impl)
    y = torch.cat([y1, y2], dim=1)
    return y, end, torch.autograd.grad(_objective(y, end), tensors)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("kind,ns_block", [("mlp", 8), ("gated_mlp", 2), ("linear", 12)])
def test_state_passing_inside_a_block_equals_one_call(impl, kind, ns_block):
    """The split at token 4 falls on a chunk boundary but inside a block (for ns_block 8 and 12):
    the open block (start weights, sum, lr, token count) is carried."""
    cfg = MemoryConfig(kind, "muon_block", "l2", window=3, chunk=4, degree=2, ns_block=ns_block)
    one = _run(impl, cfg, make_inputs(cfg, length=14))
    two = _two_calls(impl, cfg, make_inputs(cfg, length=14), at=4)
    _assert_same(two, one, tol=1e-10)


def test_ns_block_must_fit_the_chunk_grid():
    with pytest.raises(ValueError, match="ns_block=6 must divide chunk=4"):
        MemoryConfig("mlp", "muon_block", chunk=4, ns_block=6)
    MemoryConfig("mlp", "muon_block", chunk=4, ns_block=2)
    MemoryConfig("mlp", "muon_block", chunk=4, ns_block=12)
