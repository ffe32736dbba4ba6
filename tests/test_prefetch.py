"""The background batch prefetcher: the same micro-batches as building them inline, errors reach
the training thread, and closing stops the thread even when it is blocked on a full queue."""
from __future__ import annotations

import pytest
import torch

from megatron_atlas.data.config import DataConfig, MQARDataConfig
from megatron_atlas.train.data import TrainStream, fresh_state
from megatron_atlas.train.prefetch import StepPrefetcher

CPU = torch.device("cpu")


def _stream() -> TrainStream:
    cfg = DataConfig(kind="synthetic_mqar", mqar=MQARDataConfig(vocab_size=64, num_kv_pairs=2))
    return TrainStream(cfg, fresh_state(cfg, seed=2), micro_batch_size=2, seq_len=16, model_vocab=64)


def _build(stream: TrainStream, accum: int = 3):
    return lambda step: [stream.batch(step * accum + j) for j in range(accum)]


@pytest.mark.parametrize("depth", [1, 4])
def test_prefetched_batches_equal_inline_ones(depth):
    inline = StepPrefetcher(_build(_stream()), range(2, 9), CPU, depth=0)
    ahead = StepPrefetcher(_build(_stream()), range(2, 9), CPU, depth=depth)
    with inline, ahead:
        for _ in range(2, 9):
            a, b = inline.next(), ahead.next()
            assert len(a) == len(b) == 3
            assert all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def test_an_error_while_building_is_raised_in_the_consumer():
    def build(step: int):
        if step == 3:
            raise RuntimeError("shard 7 is unreadable")
        return [(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))]
    with StepPrefetcher(build, range(5), CPU, depth=2) as prefetch:
        for _ in range(3):
            prefetch.next()
        with pytest.raises(RuntimeError, match="shard 7 is unreadable"):
            prefetch.next()


def test_close_stops_a_producer_blocked_on_a_full_queue():
    prefetch = StepPrefetcher(_build(_stream()), range(10_000), CPU, depth=1)
    prefetch.next()
    prefetch.close()
    assert not prefetch._thread.is_alive()
