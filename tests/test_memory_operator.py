"""The memory operator: chunked dual form vs the token-loop reference, state passing, online rule."""
from __future__ import annotations

import itertools

import pytest
import torch

from kernels.memory import Gates, MemoryConfig, memory_forward, poly_features, poly_kernel
from kernels.newton_schulz import newton_schulz
from tests.memory_cases import leaves, make_inputs, relative_error

COMBOS = list(itertools.product(["linear", "mlp", "gated_mlp"], ["gd", "muon"], ["l2", "dot"],
                                [1, 3], [1, 4, 16], [1, 2]))


def _run_with_grads(impl: str, cfg: MemoryConfig, inputs):
    q, k, v, gates, params = inputs
    tensors = leaves(q, k, v, gates, params)
    y, state = memory_forward(q, k, v, gates, params, cfg, impl=impl)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    objective = (y * probe).sum() + sum(w.sum() for w in state.weights.values()) \
        + sum(s.pow(2).sum() for s in state.momentum.values())
    return y, state, torch.autograd.grad(objective, tensors)


@pytest.mark.parametrize("kind,rule,loss,window,chunk,degree", COMBOS)
def test_chunked_equals_reference(kind, rule, loss, window, chunk, degree):
    cfg = MemoryConfig(kind, rule, loss, window, chunk, degree)
    # T = 11 is not a multiple of 4 or 16; the last chunk is short.
    y_ref, s_ref, g_ref = _run_with_grads("reference", cfg, make_inputs(cfg, length=11))
    y, s, g = _run_with_grads("chunked", cfg, make_inputs(cfg, length=11))
    assert relative_error(y, y_ref) < 1e-8
    for name in s_ref.weights:
        assert relative_error(s.weights[name], s_ref.weights[name]) < 1e-8
        assert relative_error(s.momentum[name], s_ref.momentum[name]) < 1e-8
    for actual, expected in zip(g, g_ref):
        assert relative_error(actual, expected) < 1e-8


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("kind,rule", list(itertools.product(["linear", "mlp", "gated_mlp"], ["gd", "muon"])))
def test_chunked_equals_reference_with_retention_towards_zero(kind, rule, momentum):
    """anchor=False: retention decays towards zero, as the papers write the rules."""
    cfg = MemoryConfig(kind, rule, "l2", window=2, chunk=4, degree=2, anchor=False)
    y_ref, s_ref, g_ref = _run_with_grads("reference", cfg, make_inputs(cfg, momentum=momentum))
    y, s, g = _run_with_grads("chunked", cfg, make_inputs(cfg, momentum=momentum))
    assert relative_error(y, y_ref) < 1e-8
    for name in s_ref.weights:
        assert relative_error(s.weights[name], s_ref.weights[name]) < 1e-8
    for actual, expected in zip(g, g_ref):
        assert relative_error(actual, expected) < 1e-8


def test_anchored_retention_differs_from_retention_towards_zero():
    cfg = MemoryConfig("mlp", "gd", "l2", window=2, chunk=4)
    zero = MemoryConfig("mlp", "gd", "l2", window=2, chunk=4, anchor=False)
    y, _ = memory_forward(*make_inputs(cfg), cfg, impl="chunked")
    y_zero, _ = memory_forward(*make_inputs(zero), zero, impl="chunked")
    assert relative_error(y, y_zero) > 1e-3


@pytest.mark.parametrize("kind,rule", [("mlp", "gd"), ("gated_mlp", "muon"), ("linear", "gd")])
def test_chunked_without_momentum(kind, rule):
    cfg = MemoryConfig(kind, rule, "l2", window=2, chunk=4, degree=2)
    y_ref, s_ref, g_ref = _run_with_grads("reference", cfg, make_inputs(cfg, momentum=False))
    y, s, g = _run_with_grads("chunked", cfg, make_inputs(cfg, momentum=False))
    assert relative_error(y, y_ref) < 1e-8
    for actual, expected in zip(g, g_ref):
        assert relative_error(actual, expected) < 1e-8


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gd_recurrence_any_thread_count(kind, threads):
    """On CPU the gd recurrence splits the (batch, head) rows into one group per thread (4 rows
    here: one group, or uneven groups); the result must not depend on it."""
    cfg = MemoryConfig(kind, "gd", "l2", window=2, chunk=4, degree=1)
    y_ref, s_ref, g_ref = _run_with_grads("reference", cfg, make_inputs(cfg))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, s, g = _run_with_grads("chunked", cfg, make_inputs(cfg))
    finally:
        torch.set_num_threads(previous)
    assert relative_error(y, y_ref) < 1e-8
    for actual, expected in zip(g, g_ref):
        assert relative_error(actual, expected) < 1e-8


def _split(x, at):
    return None if x is None else (x[:, :at], x[:, at:])


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("kind,rule,window", [("mlp", "gd", 3), ("linear", "muon", 3),
                                              ("gated_mlp", "gd", 1), ("mlp", "muon", 6)])
def test_state_passing_equals_one_call(impl, kind, rule, window):
    cfg = MemoryConfig(kind, rule, "l2", window=window, chunk=4, degree=2)
    q, k, v, gates, params = make_inputs(cfg, length=14)
    y_full, s_full = memory_forward(q, k, v, gates, params, cfg, impl=impl)
    at = 8  # a chunk boundary
    first = Gates(*[None if g is None else g[:, :at] for g in gates])
    second = Gates(*[None if g is None else g[:, at:] for g in gates])
    y1, state = memory_forward(q[:, :at], k[:, :at], v[:, :at], first, params, cfg, impl=impl)
    y2, s_end = memory_forward(q[:, at:], k[:, at:], v[:, at:], second, params, cfg, state=state, impl=impl)
    assert relative_error(torch.cat([y1, y2], dim=1), y_full) < 1e-12
    for name in s_full.weights:
        assert relative_error(s_end.weights[name], s_full.weights[name]) < 1e-12
        assert relative_error(s_end.momentum[name], s_full.momentum[name]) < 1e-12
    assert torch.equal(s_end.window_k, s_full.window_k)
    assert s_end.window_k.shape[1] == window - 1


def _two_calls_with_grads(impl: str, cfg: MemoryConfig, inputs, at: int):
    """Outputs of two calls (the second continues from the first's state) and the gradients of
    every leaf, which reach the first call through the carried weights and momentum."""
    q, k, v, gates, params = inputs
    tensors = leaves(q, k, v, gates, params)
    first = Gates(*[None if g is None else g[:, :at] for g in gates])
    second = Gates(*[None if g is None else g[:, at:] for g in gates])
    y1, state = memory_forward(q[:, :at], k[:, :at], v[:, :at], first, params, cfg, impl=impl)
    y2, s_end = memory_forward(q[:, at:], k[:, at:], v[:, at:], second, params, cfg, state=state,
                               impl=impl)
    y = torch.cat([y1, y2], dim=1)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    objective = (y * probe).sum() + sum(s.pow(2).sum() for s in s_end.momentum.values())
    return y, torch.autograd.grad(objective, tensors)


@pytest.mark.parametrize("kind,loss,window,degree,d_v", [("mlp", "l2", 3, 2, 4), ("mlp", "dot", 1, 1, 3),
                                                         ("mlp", "l2", 2, 1, 3), ("linear", "l2", 3, 1, 5)])
def test_gradients_through_carried_state(kind, loss, window, degree, d_v):
    """Covers the gradient of the incoming momentum, and d_k != d_v (an mlp memory without residual)."""
    cfg = MemoryConfig(kind, "gd", loss, window=window, chunk=4, degree=degree)
    y_ref, g_ref = _two_calls_with_grads("reference", cfg, make_inputs(cfg, length=14, d_v=d_v), at=8)
    y, g = _two_calls_with_grads("chunked", cfg, make_inputs(cfg, length=14, d_v=d_v), at=8)
    assert relative_error(y, y_ref) < 1e-8
    for actual, expected in zip(g, g_ref):
        assert relative_error(actual, expected) < 1e-8


def _online_linear(q, k, v, gates: Gates, W0, rule: str, window: int, anchor=None, ns_steps: int = 5):
    """The per-token rule for a linear memory with l2 loss, written out by hand (b = 1); with
    `anchor`, retention decays towards it instead of towards zero.

    Every gradient of token t's window is taken at W_{t-1}: grad_W 0.5||W k_i - v_i||^2 = (W k_i - v_i) k_i^T.
    """
    batch, length, heads, _ = q.shape
    W = W0.unsqueeze(0).expand(batch, *W0.shape).clone()
    S = torch.zeros_like(W)
    out = []
    for t in range(length):
        U = torch.zeros_like(W)
        for i in range(max(0, t - window + 1), t + 1):
            k_i, v_i = k[:, i], v[:, i]                                   # [B, H, d]
            err = torch.einsum("bhok,bhk->bho", W, k_i) - v_i
            U = U + gates.g[:, i, :, None, None] * torch.einsum("bho,bhk->bhok", err, k_i)
        a, e, th = (gates.alpha[:, t, :, None, None], gates.eta[:, t, :, None, None],
                    gates.theta[:, t, :, None, None])
        kept = a * W if anchor is None else anchor + a * (W - anchor)
        if rule == "gd":
            S = th * S + e * U
            W = kept - S
        else:
            S = th * S + U
            W = kept - e * newton_schulz(S, ns_steps)
        out.append(torch.einsum("bhok,bhk->bho", W, q[:, t]))
    return torch.stack(out, dim=1), W


@pytest.mark.parametrize("anchored", [True, False])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("rule,window", [("gd", 1), ("gd", 3), ("muon", 1), ("muon", 2)])
def test_chunk_one_is_the_online_rule(impl, rule, window, anchored):
    cfg = MemoryConfig("linear", rule, "l2", window=window, chunk=1, degree=1, anchor=anchored)
    q, k, v, gates, params = make_inputs(cfg, length=9, d_k=4, d_v=3)
    y, state = memory_forward(q, k, v, gates, params, cfg, impl=impl)
    W0 = params["W"].unsqueeze(0) if anchored else None   # anchored retention decays towards W0
    y_online, W_online = _online_linear(q, k, v, gates, params["W"], rule, window, W0)
    assert relative_error(y, y_online) < 1e-10
    assert relative_error(state.weights["W"], W_online) < 1e-10


def test_chunking_changes_the_result():
    """Guards against a chunk size that is silently ignored: b = 4 must differ from b = 1."""
    outs = []
    for chunk in (1, 4):
        cfg = MemoryConfig("mlp", "gd", "l2", window=1, chunk=chunk)
        outs.append(memory_forward(*make_inputs(cfg), cfg)[0])
    assert relative_error(outs[0], outs[1]) > 1e-4


@pytest.mark.parametrize("degree", [2, 3])
def test_polynomial_kernel_matches_features(degree):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    a = torch.rand(degree + 1, generator=gen, dtype=torch.float64)
    explicit = poly_features(x, a, degree) @ poly_features(y, a, degree).T
    dots = x @ y.T
    expected = sum(a[i] * dots ** i for i in range(degree + 1))
    assert torch.allclose(explicit, expected, atol=1e-12)
    assert torch.allclose(poly_kernel(x, y, a, degree), expected, atol=1e-12)
    assert poly_features(x, a, degree).shape[-1] == {2: 28, 3: 84}[degree]  # C(6 + p, p)


@pytest.mark.parametrize("shape", [(3, 8, 5), (2, 5, 8)])
def test_newton_schulz_orthogonalises(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    singular = torch.linalg.svdvals(newton_schulz(x, 5))
    assert singular.min() > 0.6 and singular.max() < 1.25
    # raw singular values are spread; NS shrinks the spread towards 1
    assert torch.linalg.svdvals(x).max() > 1.5


def test_bad_config_names_the_value():
    with pytest.raises(ValueError, match="kind='conv'"):
        MemoryConfig(kind="conv")
    with pytest.raises(ValueError, match="window=0"):
        MemoryConfig(window=0)
    cfg = MemoryConfig()
    q, k, v, gates, params = make_inputs(cfg)
    with pytest.raises(ValueError, match="impl='fast'"):
        memory_forward(q, k, v, gates, params, cfg, impl="fast")
    with pytest.raises(ValueError, match="missing"):
        memory_forward(q, k, v, gates, {"W1": params["W1"]}, cfg)
