"""The loader state is (seed, epoch, samples consumed globally): DP ranks split each global batch,
and a run resumed on another DP size continues the same global sequence of samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_atlas.data.config import DataConfig, MQARDataConfig, ShardsDataConfig
from megatron_atlas.train.data import TrainStream, fresh_state, upgrade_state
from tests.test_data_shards import _corpus, _prepare


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("dp_shards")
    out = base / "out"
    _prepare(_corpus(base / "text", n_docs=12), out)   # ~50 train samples: epochs end
    return out


def _config(kind: str, shard_dir) -> DataConfig:
    if kind == "shards":
        return DataConfig(kind="shards", shards=ShardsDataConfig(path=str(shard_dir)))
    return DataConfig(kind="synthetic_mqar", mqar=MQARDataConfig(vocab_size=64, num_kv_pairs=2))


def _global(cfg: DataConfig, start: dict, k: int, micro: int, dp: int) -> torch.Tensor:
    """Micro-batch k of the whole DP group: the ranks' rows stacked in rank order."""
    ranks = [TrainStream(cfg, start, micro_batch_size=micro, seq_len=16, model_vocab=300, dp_rank=r, dp_size=dp)
             for r in range(dp)]
    return torch.cat([s.batch(k)[0] for s in ranks])


@pytest.mark.parametrize("kind", ["synthetic_mqar", "shards"])
def test_resume_on_another_dp_size_continues_the_global_sequence(kind, shard_dir):
    cfg = _config(kind, shard_dir)
    start = fresh_state(cfg, seed=3, micro_batch_size=4, dp_size=1)
    one = TrainStream(cfg, start, micro_batch_size=4, seq_len=16, model_vocab=300)
    # the single-process stream, long enough to cross an epoch of the shard split
    reference = torch.cat([one.batch(k)[0] for k in range(30)])
    # 2 ranks with 2 samples each read exactly the one-process micro-batches
    assert torch.equal(torch.cat([_global(cfg, start, k, 2, 2) for k in range(5)]), reference[:20])
    # stop after 5 micro-batches on 2 ranks, resume on 4 ranks of 1 sample, then on 1 rank of 4
    saved = TrainStream(cfg, start, micro_batch_size=2, seq_len=16, model_vocab=300, dp_size=2).state(5)
    assert saved["consumed"] + saved["epoch"] * getattr(one.source, "num_samples", 0) == 20
    resumed = torch.cat([_global(cfg, saved, k, 1, 4) for k in range(10)])
    assert torch.equal(resumed, reference[20:60])
    later = TrainStream(cfg, saved, micro_batch_size=1, seq_len=16, model_vocab=300, dp_size=4).state(10)
    tail = TrainStream(cfg, later, micro_batch_size=4, seq_len=16, model_vocab=300)
    assert torch.equal(torch.cat([tail.batch(k)[0] for k in range(15)]), reference[60:120])
    if kind == "shards":   # 120 samples cross at least one epoch boundary of this split
        assert tail.state(15)["epoch"] >= 1
        ids = [int(i) for k in range(0, 30) for i in one.source.sample_ids(k)]
        n = one.source.num_samples
        assert sorted(ids[:n]) == list(range(n))   # one epoch sees every sample once


def test_mqar_samples_come_from_their_position_and_old_block_states_continue():
    """A fresh MQAR stream generates sample i from (seed, i) alone; a state written when samples
    were generated micro_batch_size x dp_size at a time (block 3 here) continues that stream."""
    from megatron_atlas.data.synthetic import MQARSource
    cfg = _config("synthetic_mqar", None)
    stream = TrainStream(cfg, fresh_state(cfg, seed=5), micro_batch_size=3, seq_len=16, model_vocab=64)
    one = MQARSource(1, 16, 64, 2, seed=5)
    assert all(torch.equal(stream.batch(k)[0], torch.cat([one.batch(3 * k + r)[0] for r in range(3)]))
               for k in range(4))
    plain = MQARSource(3, 16, 64, 2, seed=5)
    old = {"seed": 5, "micro_batch_size": 3, "micro_batches": 7}
    assert upgrade_state(old) == {"seed": 5, "epoch": 0, "consumed": 21, "block": 3}
    again = TrainStream(cfg, upgrade_state(old), micro_batch_size=3, seq_len=16, model_vocab=64)
    assert torch.equal(again.batch(0)[1], plain.batch(7)[1])
    assert np.array_equal(stream.state(7)["consumed"], 21)


def test_each_dp_rank_generates_only_its_own_mqar_rows(monkeypatch):
    from megatron_atlas.data import synthetic
    cfg = _config("synthetic_mqar", None)
    generated = []
    real = synthetic.mqar_batch

    def counted(batch_size, *args, **kwargs):
        generated.append(batch_size)
        return real(batch_size, *args, **kwargs)
    monkeypatch.setattr(synthetic, "mqar_batch", counted)
    rank = TrainStream(cfg, fresh_state(cfg, seed=1), micro_batch_size=2, seq_len=16, model_vocab=64,
                       dp_rank=3, dp_size=4)
    for k in range(3):
        rank.batch(k)
    assert sum(generated) == 3 * 2   # its 2 rows per micro-batch, not the 8 of the global batch
