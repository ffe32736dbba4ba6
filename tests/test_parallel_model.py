"""TP=2 and TP=2 with sequence parallelism equal TP=1 for every preset (gloo, 2 CPU processes):
the same seed builds the same full weights, and the gathered logits, the loss and every
parameter's gradient (gathered along its partition dim) match to 1e-5 in fp32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_atlas.configs import available, compose, to_model_config
from megatron_atlas.model import build_model
from megatron_atlas.parallel import ParallelConfigError, ParallelState, build_parallel_state
from megatron_atlas.parallel.collectives import all_gather, record_comm
from megatron_atlas.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_atlas.parallel.grads import reduce_sequence_parallel_grads
from megatron_atlas.parallel.layers import gather_logits
from megatron_atlas.parallel.sharding import partition_dims
from megatron_atlas.parallel.local_launch import run_local

PRESETS = available("model")
SEQ = 32          # two memory chunks of 16; even, so sequence parallelism can split it
# presets batched two processes at a time; the extra cases cover GQA, persistent/sink tokens and tied
# embeddings (T + n_persist = 32 still splits in two)
CASES = [[(p, ()) for p in PRESETS[:4]],
         [(p, ()) for p in PRESETS[4:]] + [("atlas_mag", ("model.attention.n_kv_heads=2", "model.n_persist=2",
                                                          "model.tie_embeddings=true")),
                                  ("transformer", ("model.block=swa",))]]


def tiny(preset: str, overrides=()):
    return to_model_config(compose(preset, "tiny", "tiny", list(overrides)))


def _gathered(model, values: dict, parallel) -> dict:
    dims = partition_dims(model)
    return {name: all_gather(v.contiguous(), dims[name], parallel.tp_group) if name in dims else v
            for name, v in values.items()}


def _check_case(preset: str, overrides, states, rank: int) -> None:
    cfg = tiny(preset, overrides)
    seq = SEQ - cfg.n_persist
    ids = torch.randint(0, cfg.vocab_size, (2, seq + 1), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    ref = build_model(cfg)
    ref_logits = ref(ids[:, :-1])
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), ids[:, 1:].flatten())
    ref_loss.backward()
    ref_weights = dict(ref.named_parameters())
    for parallel in states:
        where = f"{preset}{list(overrides)} {parallel.describe()}"
        torch.manual_seed(0)
        model = build_model(cfg, parallel=parallel)
        reduce_sequence_parallel_grads(model, parallel)   # the training loop's path
        params = dict(model.named_parameters())
        for name, weight in _gathered(model, {n: p.detach() for n, p in params.items()}, parallel).items():
            assert torch.equal(weight, ref_weights[name].detach()), f"{where}: init of {name} differs"
        local_logits = model(ids[:, :-1])
        assert local_logits.shape[-1] == cfg.vocab_size // parallel.tp_size
        torch.testing.assert_close(gather_logits(local_logits, parallel), ref_logits, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{where}: logits: {m}")
        loss = vocab_parallel_cross_entropy(local_logits, ids[:, 1:], parallel).mean()
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
        loss.backward()
        grads = _gathered(model, {n: p.grad for n, p in params.items()}, parallel)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_weights[name].grad, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{where}: grad of {name}: {m}")
        tagged = [n for n, p in params.items() if getattr(p, "sequence_parallel", False)]
        assert bool(tagged) == parallel.sequence_parallel, f"{where}: sequence_parallel tags {tagged}"
        if cfg.has_memory:
            _check_memory_operator_is_local(model, cfg, where)


def _check_memory_operator_is_local(model, cfg, where: str) -> None:
    """The memory operator on this rank's heads issues no collective; the only one in its backward
    is the gradient of the feature coefficients shared by all heads (degree > 1)."""
    layer = model.blocks[0].mixers["memory"]
    tokens, _ = layer._project(torch.randn(2, SEQ, cfg.d_model), None)
    with record_comm() as forward:
        y = layer._memory(tokens, None)[0]
    with record_comm() as backward:
        y.sum().backward()
    assert forward == [], f"{where}: memory operator forward communicated {forward}"
    expected = [("all_reduce", 4 * (cfg.memory.degree + 1))] if cfg.memory.degree > 1 else []
    assert [(r.op, r.bytes) for r in backward] == expected, f"{where}: {backward}"


def _equivalence_worker(rank: int, world: int, cases, tp: int = 2) -> None:
    states = [build_parallel_state(tp_size=tp), build_parallel_state(tp_size=tp, sequence_parallel=True)]
    for preset, overrides in cases:
        _check_case(preset, overrides, states, rank)


@pytest.mark.parametrize("cases", CASES, ids=lambda c: "+".join(p for p, _ in c))
def test_tp2_and_sequence_parallel_equal_tp1(cases):
    run_local(_equivalence_worker, world=2, args=(cases,), timeout_s=420)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4], ids=["tp2xdp2", "tp4"])
def test_four_processes_equal_tp1(tp):
    """Four ranks: TP=4, or TP=2 inside each of two data-parallel replicas (groups of adjacent ranks)."""
    cases = [("atlas_mag", ("model.n_persist=4",)), ("transformer", ("model.attention.n_kv_heads=4",))]
    run_local(_equivalence_worker, world=4, args=(cases, tp), timeout_s=900)


def test_configs_that_cannot_split_are_refused_with_their_numbers():
    # refusals come before any communication, so a ParallelState without groups is enough here
    tp2, sp2 = ParallelState(tp_size=2), ParallelState(tp_size=2, sequence_parallel=True)
    for preset, override in [("transformer", "model.n_heads=1"), ("atlas_mag", "model.attention.n_kv_heads=1"),
                             ("titans", "model.vocab_size=255"), ("titans", "model.ffn_hidden=129")]:
        with pytest.raises(ParallelConfigError, match=f"tp=2 must divide .*{override}"):
            build_model(tiny(preset, (override,)), parallel=tp2)
    model = build_model(tiny("titans"), parallel=sp2)
    with pytest.raises(ParallelConfigError, match=r"\(31 tokens \+ 0 persistent = 31\) divisible by tp=2"):
        model(torch.zeros(1, 31, dtype=torch.long))
    with pytest.raises(ParallelConfigError, match="tp=2"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 2)
