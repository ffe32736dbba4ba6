"""The chunked cross entropy (the training loss with and without TP; the TP case is checked on 2
ranks in test_parallel_collectives): value and gradient equal F.cross_entropy's, over several
chunks, and no fp32 copy of the whole logits is made or saved for backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_atlas.parallel.cross_entropy import vocab_parallel_cross_entropy

N, V = 37, 50   # tokens, vocabulary: 5 chunks of 8 with a short last one


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=gen, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[[0, 5, 6, 30]] = -100
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_chunked_loss_and_gradient_equal_torch(dtype):
    logits, labels = _inputs(dtype)
    weights = torch.rand(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mine = logits.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(mine.view(1, N, V), labels.view(1, N), None, chunk_tokens=8)
    assert loss.dtype == torch.float32 and loss.shape == (1, N)
    (loss.view(N) * weights).sum().backward()
    ref_logits = logits.detach().double().requires_grad_(True)   # reference in fp64 on the same values
    ref = F.cross_entropy(ref_logits, labels, reduction="none")
    (ref * weights).sum().backward()
    tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    torch.testing.assert_close(loss.view(N).double(), ref, atol=tol, rtol=tol)
    assert torch.all(loss.view(N)[[0, 5, 6, 30]] == 0)
    assert mine.grad.dtype == dtype and torch.all(mine.grad[[0, 5, 6, 30]] == 0)
    # the loss is fp32, so even fp64 logits get their upstream gradient rounded to fp32; bf16: its rounding
    grad_tol = {torch.float64: 1e-7, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(mine.grad.double(), ref_logits.grad, atol=grad_tol, rtol=grad_tol)


def test_the_chunk_size_does_not_change_the_result():
    logits, labels = _inputs(torch.float32)
    results = []
    for chunk in (1, 8, N, 1000):
        x = logits.clone().requires_grad_(True)
        vocab_parallel_cross_entropy(x, labels, None, chunk_tokens=chunk).sum().backward()
        results.append(x.grad)
    assert all(torch.allclose(r, results[0], atol=1e-7) for r in results)


def _saved_tensors(fn) -> list[torch.Tensor]:
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_no_fp32_copy_of_the_whole_logits_is_kept_for_backward():
    logits, labels = _inputs(torch.bfloat16)
    logits.requires_grad_(True)
    full = N * V

    def big_fp32(saved: list[torch.Tensor]) -> list[tuple]:
        return [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.numel() >= full]
    # the check has teeth: the upcast-then-cross-entropy it replaced keeps an fp32 [N, V] tensor
    assert big_fp32(_saved_tensors(lambda: F.cross_entropy(logits.float(), labels).backward()))
    saved = _saved_tensors(lambda: vocab_parallel_cross_entropy(logits, labels, None, chunk_tokens=8).sum().backward())
    assert big_fp32(saved) == []
    assert sum(t.numel() * t.element_size() for t in saved) <= logits.numel() * 2 + N * (8 + 8)
    assert any(t.data_ptr() == logits.data_ptr() for t in saved)   # the logits themselves, not a copy


def test_mismatched_labels_are_refused():
    with pytest.raises(ValueError, match=r"labels \(3,\) do not match logits \(4, 5\)"):
        vocab_parallel_cross_entropy(torch.zeros(4, 5), torch.zeros(3, dtype=torch.long), None)
