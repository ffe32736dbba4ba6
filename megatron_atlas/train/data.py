"""The training batches of one data-parallel rank, addressed by global sample position.

The loader state is `(seed, epoch, consumed)`: samples consumed globally (over all DP ranks) in the
current epoch, as in `data.shards.LoaderState`. Micro-batch `k` after the state is the slice
`[position + k * G, position + (k + 1) * G)` of the global sample stream, G = micro_batch_size x
dp_size, and DP rank r takes rows `[r * micro_batch_size, (r + 1) * micro_batch_size)` of it. So one
process with micro_batch_size 4 reads the same samples per micro-batch as 2 ranks with 2 each, and
a run resumed on another DP size continues the same global sequence.

- shards: the stream is `ShardSource`'s (epochs of a (seed, epoch) permutation).
- synthetic MQAR: samples are generated `block` at a time from (seed, block number), so the stream
  is "rows of generated block 0, then of block 1, ...". A run starts with block 1: every sample is
  generated from (seed, its global position) alone, so each DP rank generates only its own rows and
  any layout reads the same samples. `block` is kept in the loader state: checkpoints of runs that
  generated micro_batch_size x dp_size samples at a time (the stream before block 1) continue
  their own stream exactly. There are no epochs (epoch stays 0).

Every state also records the data's identity (`data`: tokenizer and shard set, data/identity.py);
a stream started from a state recorded on other data refuses, unless train.data.allow_data_change.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_atlas.data.config import STATEFUL_KINDS, DataConfig
from megatron_atlas.data.identity import check_identity, data_identity
from megatron_atlas.data.sources import build_source, train_order_seed

Batch = tuple[torch.Tensor, torch.Tensor]


def fresh_state(cfg: DataConfig, *, seed: int, micro_batch_size: int = 0, dp_size: int = 0) -> dict:
    """The loader state of a run's first step. `micro_batch_size` and `dp_size` no longer matter
    (the MQAR block is one sample whatever the layout); accepted for existing callers."""
    state = {"seed": train_order_seed(cfg, seed), "epoch": 0, "consumed": 0}
    if cfg.kind == "synthetic_mqar":
        state["block"] = 1
    return state


def upgrade_state(loader: dict) -> dict:
    """Loader states of checkpoints written before (seed, epoch, consumed): a micro-batch count."""
    if "consumed" in loader:
        return loader
    b = loader["micro_batch_size"]
    return {"seed": loader["seed"], "epoch": 0, "consumed": loader["micro_batches"] * b, "block": b}


class TrainStream:
    """`batch(k)`: this rank's micro-batch `k` counted from `start`; `state(k)`: the loader state
    after micro-batches `< k` (what a checkpoint stores)."""

    def __init__(self, cfg: DataConfig, start: dict, *, micro_batch_size: int, seq_len: int,
                 model_vocab: int, dp_rank: int = 0, dp_size: int = 1) -> None:
        self.start, self.kind = dict(start), cfg.kind
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.global_batch = micro_batch_size * dp_size
        common = dict(seq_len=seq_len, model_vocab=model_vocab, seed=start["seed"], split="train")
        if cfg.kind in STATEFUL_KINDS:
            self.source = build_source(cfg, batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                       start=start, **common)
        else:
            self.block = int(start["block"])
            self.source = build_source(cfg, batch_size=self.block, **common)
            self._cached: tuple[int, Optional[Batch]] = (-1, None)
        self.identity = data_identity(self.source, cfg.kind)
        check_identity(start.get("data"), self.identity, cfg.allow_data_change)

    def _position(self, k: int) -> int:
        """MQAR's global stream position of micro-batch k's first sample (shards count their own)."""
        return self.start["consumed"] + k * self.global_batch

    def state(self, k: int) -> dict:
        return {**self._position_state(k), "data": self.identity}

    def _position_state(self, k: int) -> dict:
        if self.kind in STATEFUL_KINDS:
            return self.source.state(k).to_dict()
        position = self._position(k)
        return {"seed": self.start["seed"], "epoch": 0, "consumed": position, "block": self.block}

    def batch(self, k: int) -> Batch:
        if self.kind in STATEFUL_KINDS:
            return self.source.batch(k)
        first = self._position(k) + self.dp_rank * self.micro_batch_size
        return self._rows(first, self.micro_batch_size)

    def _generated(self, index: int) -> Batch:
        if self._cached[0] != index:   # consecutive micro-batches mostly share a generated batch
            self._cached = (index, self.source.batch(index))
        return self._cached[1]

    def _rows(self, first: int, count: int) -> Batch:
        parts, position = [], first
        while position < first + count:
            index, row = divmod(position, self.block)
            take = min(self.block - row, first + count - position)
            ids, labels = self._generated(index)
            parts.append((ids[row:row + take], labels[row:row + take]))
            position += take
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
