"""Build the batch source that a DataConfig names; every source yields `(input_ids, labels)`.

A source is random access (`batch(index)`), so the loop asks for micro-batch `step * grad_accum + j`
and a resumed run asks for the same batches again.
"""
from __future__ import annotations

from typing import Protocol

import torch

from megatron_atlas.data.config import DataConfig
from megatron_atlas.data.synthetic import MQARSource
from megatron_atlas.model.config import ConfigError


class BatchSource(Protocol):
    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_ids, labels)`, LongTensor `[B, T]`; labels are IGNORE_INDEX where unscored."""
        ...


def build_source(cfg: DataConfig, *, batch_size: int, seq_len: int, model_vocab: int,
                 seed: int) -> BatchSource:
    if cfg.kind == "synthetic_mqar":
        mqar = cfg.mqar
        vocab = mqar.vocab_size or model_vocab
        if vocab > model_vocab:
            raise ConfigError(f"train.data.mqar.vocab_size={vocab} exceeds model.vocab_size={model_vocab}")
        try:
            return MQARSource(batch_size, seq_len, vocab, mqar.num_kv_pairs, seed,
                              power_a=mqar.power_a, random_non_queries=mqar.random_non_queries)
        except ValueError as e:
            raise ConfigError(f"train.data.mqar does not fit train.seq_len / the vocabulary: {e}") from None
    raise ConfigError(f"train.data.kind={cfg.kind!r} has no source")   # DataConfig.validate lists kinds
