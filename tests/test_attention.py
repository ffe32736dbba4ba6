"""Attention branch: backends vs a dense reference, O(T*w) memory, decoding cache, RoPE."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_atlas.model.attention import CausalSelfAttention, causal_attention
from megatron_atlas.model.rope import apply_rope

B, T, H, HKV, D = 2, 29, 4, 2, 8


def reference_attention(q, k, v, window, n_sink):
    """Dense masked softmax with an explicit [T, T] mask built element by element."""
    t_len = q.shape[1]
    mask = torch.zeros(t_len, t_len, dtype=torch.bool)
    for t in range(t_len):
        for s in range(t + 1):
            mask[t, s] = window is None or t - s < window or s < n_sink
    rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)           # query head h uses kv head h // rep
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)


def _inputs(t_len=T, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, t_len, H, D), (B, t_len, HKV, D), (B, t_len, HKV, D)]
    return [torch.randn(s, generator=g, dtype=dtype, requires_grad=True) for s in shapes]


def _value_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    return out, grads


CASES = [(w, s) for w in (1, 3, 8) for s in (0, 2)] + [(None, 0), (None, 2)]
# blockwise is only defined for a window
BACKEND_CASES = [(b, w, s) for b in ("sdpa", "blockwise", "auto") for w, s in CASES
                 if not (b == "blockwise" and w is None)]


@pytest.mark.parametrize("backend,window,n_sink", BACKEND_CASES)
def test_backend_matches_dense_reference(backend, window, n_sink):
    q, k, v = _inputs()
    out, grads = _value_and_grads(lambda *a: causal_attention(*a, window, n_sink, backend), q, k, v)
    ref, ref_grads = _value_and_grads(lambda *a: reference_attention(*a, window, n_sink), q, k, v)
    assert out.shape == (B, T, H, D)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=0, atol=1e-10, msg=f"grad wrt {name}")


def test_blockwise_sink_beyond_sequence_and_window_over_length():
    # n_sink > T and window > T are legal corner cases: both reduce to plain causal attention.
    q, k, v = _inputs(t_len=5)
    ref = reference_attention(q, k, v, None, 0)
    torch.testing.assert_close(causal_attention(q, k, v, 3, n_sink=9, backend="blockwise"), ref,
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(causal_attention(q, k, v, 64, backend="blockwise"), ref, rtol=0, atol=1e-10)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor produced by any aten op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_intermediate(backend, t_len, window, n_sink):
    q, k, v = (x.detach().float().requires_grad_() for x in _inputs(t_len=t_len))
    with _LargestTensor() as probe:
        causal_attention(q, k, v, window, n_sink, backend).square().sum().backward()
    return probe.largest


def test_blockwise_memory_is_linear_in_length():
    t_len, window, n_sink = 8192, 16, 2
    largest = _largest_intermediate("blockwise", t_len, window, n_sink)
    band_scores = B * H * t_len * (2 * window + n_sink)      # [B, H, T/w, w, 2w + n_sink]
    assert largest <= band_scores, (largest, band_scores)
    assert largest < B * H * t_len * t_len / 100             # far from a dense [T, T] score matrix
    # The probe does see quadratic tensors when they exist: the masked SDPA path builds a [T, T] mask.
    assert _largest_intermediate("sdpa", 512, window, n_sink) >= 512 * 512


@pytest.mark.parametrize("window,n_sink", [(None, 0), (4, 0), (4, 2), (1, 2)])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_incremental_decoding_matches_full_forward(window, n_sink, chunk):
    torch.manual_seed(0)
    attn = CausalSelfAttention(d_model=32, n_heads=H, head_dim=D, n_kv_heads=HKV, window=window,
                               n_sink=n_sink, init_std=0.2).double()
    n_tokens = 50
    x = torch.randn(B, n_tokens, 32, dtype=torch.float64)
    with torch.no_grad():
        full, none_cache = attn(x)
        cache = attn.new_cache(B, dtype=torch.float64)
        pieces = []
        for start in range(0, n_tokens, chunk):
            y, cache = attn(x[:, start:start + chunk], cache)
            pieces.append(y)
            bound = start + chunk if window is None else n_sink + window - 1
            assert cache.num_cached <= bound
    assert none_cache is None
    assert cache.position == n_tokens
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-10)
    if window is None:
        assert cache.num_cached == n_tokens
    else:
        assert cache.num_cached == n_sink + window - 1


def test_full_forward_backends_agree():
    torch.manual_seed(0)
    kwargs = dict(d_model=32, n_heads=H, head_dim=D, n_kv_heads=HKV, window=4, n_sink=2)
    a = CausalSelfAttention(**kwargs, backend="sdpa").double()
    b = CausalSelfAttention(**kwargs, backend="blockwise").double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(B, 37, 32, dtype=torch.float64)
    torch.testing.assert_close(a(x)[0], b(x)[0], rtol=0, atol=1e-10)


def test_rope_is_relative():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 2, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 2, 16, generator=g, dtype=torch.float64)

    def score(m, n):
        qm = apply_rope(q, torch.tensor([m]), 10000.0)
        kn = apply_rope(k, torch.tensor([n]), 10000.0)
        return (qm * kn).sum(-1)

    for delta in (0, 1, 7, 100):
        base = score(delta, 0)
        for offset in (3, 50, 12345):
            torch.testing.assert_close(score(offset + delta, offset), base, rtol=0, atol=1e-9)
    assert not torch.allclose(score(1, 0), score(2, 0))       # it does depend on the difference
    torch.testing.assert_close(apply_rope(q, torch.tensor([0])), q)  # position 0 is the identity
    torch.testing.assert_close(apply_rope(q, torch.tensor([77])).norm(dim=-1), q.norm(dim=-1))


def test_rope_keeps_dtype():
    x = torch.randn(2, 5, 3, 8).bfloat16()
    y = apply_rope(x, torch.arange(5))
    assert y.dtype == torch.bfloat16
    ref = apply_rope(x.float(), torch.arange(5))
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


def test_bad_backend_raises():
    q, k, v = _inputs(t_len=4)
    with pytest.raises(ValueError, match="bogus"):
        causal_attention(q, k, v, 2, backend="bogus")
    with pytest.raises(ValueError, match="bogus"):
        CausalSelfAttention(32, H, D, HKV, window=4, backend="bogus")


def test_flash_not_applicable_raises():
    q, k, v = _inputs(t_len=4)
    with pytest.raises(ValueError, match="flash"):
        causal_attention(q, k, v, 2, backend="flash")
    with pytest.raises(ValueError, match="flash"):
        causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, backend="flash")


def test_flash_limits_name_what_rules_flash_out(monkeypatch):
    from megatron_atlas.model import attention
    monkeypatch.setattr(attention, "flash_attn_func", object())   # as if flash-attn were installed
    ok = dict(head_dim=128, dtype=torch.bfloat16, n_sink=0, capability=(9, 0))
    assert attention.flash_unsupported(**ok) is None
    assert attention.flash_unsupported(**{**ok, "head_dim": 256}) is None
    cases = {"head_dim <= 256, got 320": {"head_dim": 320}, "fp16/bf16": {"dtype": torch.float32},
             "sink": {"n_sink": 2}, "CUDA tensor": {"capability": None}, "8.0, this GPU has 7.5": {"capability": (7, 5)}}
    for message, change in cases.items():
        assert message in attention.flash_unsupported(**{**ok, **change}), change
    monkeypatch.setattr(attention, "flash_attn_func", None)
    assert attention.flash_unsupported(**ok) == "flash_attn is not installed"
