"""MQAR generator: deterministic from the seed, and the label layout of zoology's multiquery_ar."""
from __future__ import annotations

import pytest
import torch

from megatron_atlas.data.synthetic import IGNORE_INDEX, MQARSource, accuracy, mqar_batch

B, T, V, N = 8, 64, 128, 6


def _batch(seed: int, **kwargs):
    return mqar_batch(B, T, V, N, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_same_seed_same_batch_and_other_seeds_differ():
    x0, y0 = _batch(3)
    x1, y1 = _batch(3)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(_batch(4)[0], x0)
    source = MQARSource(B, T, V, N, seed=3)
    assert torch.equal(source.batch(5)[0], MQARSource(B, T, V, N, seed=3).batch(5)[0])
    assert not torch.equal(source.batch(5)[0], source.batch(6)[0])
    assert not torch.equal(source.batch(0)[0], MQARSource(B, T, V, N, seed=4).batch(0)[0])


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_layout_each_key_queried_once_and_labelled_with_its_value(random_non_queries):
    inputs, labels = _batch(0, random_non_queries=random_non_queries)
    assert inputs.shape == labels.shape == (B, T) and inputs.dtype == labels.dtype == torch.long
    assert inputs.min() >= 0 and inputs.max() < V
    for b in range(B):
        keys, values = inputs[b, 0:2 * N:2], inputs[b, 1:2 * N:2]
        assert ((1 <= keys) & (keys < V // 2)).all() and len(set(keys.tolist())) == N
        assert ((V // 2 <= values) & (values < V)).all() and len(set(values.tolist())) == N
        pairs = dict(zip(keys.tolist(), values.tolist()))
        positions = (labels[b] != IGNORE_INDEX).nonzero().flatten()
        assert len(positions) == N and positions.min() >= 2 * N
        queried = inputs[b, positions].tolist()
        assert sorted(queried) == sorted(pairs)                       # every key, once
        for t in positions.tolist():
            key, label = inputs[b, t].item(), labels[b, t].item()
            assert label == pairs[key]                                # the value paired with the key
            assert inputs[b, t + 1].item() == label                   # LM-shifted: next token
        if not random_non_queries:
            filler = torch.ones(T, dtype=torch.bool)
            filler[:2 * N] = False
            filler[positions] = filler[positions + 1] = False
            assert (inputs[b, filler] == 0).all()


def test_gaps_favour_short_distances():
    _, labels = mqar_batch(256, 256, 512, 4, generator=torch.Generator().manual_seed(0))
    gaps = ((labels != IGNORE_INDEX).nonzero()[:, 1] - 8) // 2
    slots = (256 - 8) // 2
    assert (gaps < slots // 4).float().mean() > 0.4   # uniform would give 0.25


def test_rejects_configurations_that_do_not_fit():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        mqar_batch(1, 16, 128, 5, generator=g)
    with pytest.raises(ValueError, match="vocab_size"):
        mqar_batch(1, 64, 8, 4, generator=g)


def test_accuracy_counts_only_labelled_positions():
    labels = torch.full((1, 4), IGNORE_INDEX)
    labels[0, 1], labels[0, 3] = 2, 0
    logits = torch.zeros(1, 4, 3)
    logits[0, :, 2] = 1.0                        # always predicts 2: right at t=1, wrong at t=3
    assert accuracy(logits, labels) == 0.5
    assert torch.isnan(torch.tensor(accuracy(logits, torch.full((1, 4), IGNORE_INDEX))))
