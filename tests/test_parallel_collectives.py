"""Each conjugate collective, the parallel layers and the vocab-parallel cross entropy against a
single-process reference (gloo, 2 CPU processes). Every rank knows all ranks' inputs and upstream
gradients (drawn from one seed), so it can compute the expected forward and backward itself."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_atlas.parallel import build_parallel_state
from megatron_atlas.parallel import collectives as C
from megatron_atlas.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_atlas.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                            gather_logits)
from megatron_atlas.parallel.sharding import gather_state_dict, partition_dims, shard_parameters_, shard_state_dict
from megatron_atlas.parallel.local_launch import run_local

SHAPE = (2, 6, 4, 8)   # [B, T, H, d]: T and H split in two


def _per_rank(world: int, shape, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(world)]


def _check(name: str, fn, x: torch.Tensor, expected_y, upstream, expected_grad) -> None:
    x = x.clone().requires_grad_(True)
    y = fn(x)
    torch.testing.assert_close(y, expected_y, msg=lambda m: f"{name} forward: {m}")
    y.backward(upstream)
    torch.testing.assert_close(x.grad, expected_grad, msg=lambda m: f"{name} backward: {m}")


def _collectives_worker(rank: int, world: int) -> None:
    group = build_parallel_state(tp_size=world).tp_group
    X, G = _per_rank(world, SHAPE, 1), _per_rank(world, SHAPE, 2)
    chunk = lambda t, dim: t.chunk(world, dim=dim)[rank]                    # noqa: E731
    cat = lambda ts, dim: torch.cat(ts, dim=dim)                           # noqa: E731
    total = lambda ts: torch.stack(ts).sum(0)                              # noqa: E731
    own = lambda ts, dim: [t.chunk(world, dim=dim)[r] for r, t in enumerate(ts)]  # noqa: E731 (rank r's part of ts[r])
    Gs, Gh = own(G, 1), own(G, -1)   # upstream grads of each rank's sequence / hidden shard
    cases = [
        ("copy_to_tp_region", C.copy_to_tp_region, X[0], X[0], G[rank], total(G)),
        ("reduce_from_tp_region", C.reduce_from_tp_region, X[rank], total(X), G[rank], G[rank]),
        ("scatter_to_tp_region", C.scatter_to_tp_region, X[0], chunk(X[0], -1), Gh[rank], cat(Gh, -1)),
        ("gather_from_tp_region", C.gather_from_tp_region, own(X, -1)[rank],
         cat(own(X, -1), -1), G[rank], chunk(G[rank], -1)),
        ("scatter_to_sequence_region", C.scatter_to_sequence_region, X[0], chunk(X[0], 1), Gs[rank], cat(Gs, 1)),
        ("gather_from_sequence_region", C.gather_from_sequence_region, own(X, 1)[rank],
         cat(own(X, 1), 1), G[rank], chunk(total(G), 1)),
        ("gather_from_sequence_region(reduce_grad=False)",
         lambda t, g: C.gather_from_sequence_region(t, g, reduce_grad=False), own(X, 1)[rank],
         cat(own(X, 1), 1), G[rank], chunk(G[rank], 1)),
        ("reduce_scatter_to_sequence_region", C.reduce_scatter_to_sequence_region, X[rank],
         chunk(total(X), 1), Gs[rank], cat(Gs, 1)),
    ]
    # context parallel: X[r] is rank r's sequence shard of the full tensor cat(X, 1)
    full = cat(X, 1)
    head_grads = [torch.randn(  # upstream grads of each rank's [B, T * world, H / world, d] output
full.shape[0], full.shape[1], SHAPE[2] // world, SHAPE[3], dtype=torch.float64,
                              generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
    cases.append(("sequence_to_heads", C.sequence_to_heads, X[rank], full.chunk(world, dim=2)[rank],
                  head_grads[rank], cat(head_grads, 2).chunk(world, dim=1)[rank]))
    cases.append(("heads_to_sequence", C.heads_to_sequence, full.chunk(world, dim=2)[rank], X[rank],
                  G[rank], cat(G, 1).chunk(world, dim=2)[rank]))
    for name, fn, x, y, upstream, grad in cases:
        _check(name, lambda t: fn(t, group), x, y, upstream, grad)
        _check(f"{name} (no group)", lambda t: fn(t, None), x, x, x, x)  # identity without a group

    # instrumentation: what was issued, and how many bytes of the full tensor it moved
    x = X[rank].clone().requires_grad_(True)
    with C.record_comm() as records:
        C.reduce_scatter_to_sequence_region(C.gather_from_sequence_region(x, group), group).sum().backward()
    full_bytes = 2 * X[rank].numel() * 8
    assert [(r.op, r.bytes) for r in records] == [("all_gather", full_bytes), ("reduce_scatter", full_bytes),
                                                  ("all_gather", full_bytes), ("reduce_scatter", full_bytes)]
    assert [r.label for r in records] == ["gather_from_sequence_region.fwd", "reduce_scatter_to_sequence_region.fwd",
                                          "reduce_scatter_to_sequence_region.bwd", "gather_from_sequence_region.bwd"]


def _layers_worker(rank: int, world: int) -> None:
    plain, sp = build_parallel_state(tp_size=world), build_parallel_state(tp_size=world, sequence_parallel=True)
    x_full = torch.randn(2, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    # column -> row MLP, replicated input, and with sequence parallelism (sequence-sharded in and out)
    for parallel in (plain, sp):
        torch.manual_seed(0)
        ref1, ref2 = nn.Linear(8, 12, bias=True).double(), nn.Linear(12, 8, bias=True).double()
        torch.manual_seed(0)
        col = ColumnParallelLinear(8, 12, bias=True, parallel=parallel).double()
        row = RowParallelLinear(12, 8, bias=True, parallel=parallel).double()
        mlp = nn.Sequential(col, row)
        assert partition_dims(mlp) == {"0.weight": 0, "0.bias": 0, "1.weight": 1}
        shard_parameters_(mlp, parallel)
        assert col.weight.shape == (12 // world, 8) and row.weight.shape == (8, 12 // world)
        x_ref = x_full.clone().requires_grad_(True)
        y_ref = ref2(torch.tanh(ref1(x_ref)))
        y_ref.square().sum().backward()
        x = (x_full.chunk(world, 1)[rank] if parallel.sequence_parallel else x_full).clone().requires_grad_(True)
        y = row(torch.tanh(col(x)))
        expect = y_ref.chunk(world, 1)[rank] if parallel.sequence_parallel else y_ref
        torch.testing.assert_close(y, expect)
        y.square().sum().backward()
        if parallel.sequence_parallel:  # the replicated row bias saw only this rank's tokens
            assert row.bias.sequence_parallel
            row.bias.grad = C.all_reduce(row.bias.grad, parallel.tp_group)
        torch.testing.assert_close(x.grad, x_ref.grad.chunk(world, 1)[rank] if parallel.sequence_parallel
                                   else x_ref.grad)
        torch.testing.assert_close(col.weight.grad, ref1.weight.grad.chunk(world, 0)[rank])
        torch.testing.assert_close(col.bias.grad, ref1.bias.grad.chunk(world, 0)[rank])
        torch.testing.assert_close(row.weight.grad, ref2.weight.grad.chunk(world, 1)[rank])
        torch.testing.assert_close(row.bias.grad, ref2.bias.grad)

    # column with gathered output; row with a replicated (not yet split) input
    torch.manual_seed(0)
    ref = nn.Linear(8, 6, bias=False).double()
    torch.manual_seed(0)
    col = shard_parameters_(ColumnParallelLinear(8, 6, parallel=plain, gather_output=True).double(), plain)
    torch.testing.assert_close(col(x_full), ref(x_full))
    torch.manual_seed(0)
    ref = nn.Linear(8, 6, bias=False).double()
    torch.manual_seed(0)
    row = shard_parameters_(RowParallelLinear(8, 6, parallel=plain, input_is_parallel=False).double(), plain)
    torch.testing.assert_close(row(x_full), ref(x_full))

    # vocab-parallel embedding
    ids = torch.randint(0, 10, (3, 7), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    ref_emb = nn.Embedding(10, 5).double()
    torch.manual_seed(0)
    emb = shard_parameters_(VocabParallelEmbedding(10, 5, parallel=plain).double(), plain)
    out = emb(ids)
    torch.testing.assert_close(out, ref_emb(ids))
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out.backward(upstream)
    ref_emb(ids).backward(upstream)
    torch.testing.assert_close(emb.weight.grad, ref_emb.weight.grad.chunk(world, 0)[rank])

    # vocab-parallel cross entropy, with ignored positions
    logits = torch.randn(3, 7, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 3
    labels = torch.randint(0, 10, (3, 7), generator=torch.Generator().manual_seed(7))
    labels[0, :3] = -100
    ref_logits = logits.clone().requires_grad_(True)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), reduction="none").view(3, 7)
    local = logits.chunk(world, -1)[rank].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, labels, plain)
    torch.testing.assert_close(loss, ref_loss.float(), atol=1e-5, rtol=1e-5)
    assert torch.all(loss[0, :3] == 0)
    weights = torch.rand(3, 7, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    (ref_loss * weights).sum().backward()
    (loss * weights).sum().backward()
    torch.testing.assert_close(local.grad, ref_logits.grad.chunk(world, -1)[rank], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gather_logits(local, plain), logits)
    chunked = local.detach().clone().requires_grad_(True)   # 21 tokens in chunks of 4: the same numbers
    (vocab_parallel_cross_entropy(chunked, labels, plain, chunk_tokens=4) * weights).sum().backward()
    torch.testing.assert_close(chunked.grad, local.grad, atol=1e-12, rtol=1e-12)

    # state-dict helpers: cut a full state dict into TP shards and join them back
    full = {"w": torch.arange(24.0).view(4, 6), "b": torch.arange(3.0)}
    shards = [shard_state_dict(full, {"w": 1}, r, 3) for r in range(3)]
    assert shards[2]["w"].shape == (4, 2) and torch.equal(shards[1]["b"], full["b"])
    assert all(torch.equal(v, full[k]) for k, v in gather_state_dict(shards, {"w": 1}).items())


def test_collectives_forward_and_backward_match_single_process():
    run_local(_collectives_worker, world=2, timeout_s=120)


def test_parallel_layers_and_cross_entropy_match_torch():
    run_local(_layers_worker, world=2, timeout_s=120)
