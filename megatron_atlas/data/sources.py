"""Build the batch source that a DataConfig names; every source yields `(input_ids, labels)`.

A source is random access (`batch(index)`), so the loop asks for micro-batch `step * grad_accum + j`
and a resumed run asks for the same batches again.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from megatron_atlas.data.config import DataConfig
from megatron_atlas.data.synthetic import MQARSource
from megatron_atlas.model.config import ConfigError


class BatchSource(Protocol):
    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_ids, labels)`, LongTensor `[B, T]`; labels are IGNORE_INDEX where unscored."""
        ...


def build_source(cfg: DataConfig, *, batch_size: int, seq_len: int, model_vocab: int, seed: int,
                 split: str, dp_rank: int = 0, dp_size: int = 1, start: Optional[dict] = None) -> BatchSource:
    """`split` is "train" or "eval" (the held-out split of sources that have one). `start` (shards
    only): a LoaderState dict to resume from; batch 0 is then the batch at that state."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} must be 'train' or 'eval'")
    if cfg.kind == "shards":
        return _shard_source(cfg, batch_size=batch_size, seq_len=seq_len, model_vocab=model_vocab,
                             seed=seed, split=split, dp_rank=dp_rank, dp_size=dp_size, start=start)
    if cfg.kind == "webdataset":
        return _stream_source(cfg, batch_size=batch_size, seq_len=seq_len, model_vocab=model_vocab, seed=seed,
                              split=split, dp_rank=dp_rank, dp_size=dp_size, start=start)
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


def train_order_seed(cfg: DataConfig, seed: int) -> int:
    """The seed the training sample order follows: `seed`, unless the shards pin their own."""
    if cfg.kind == "shards" and cfg.shards.seed is not None:
        return cfg.shards.seed
    if cfg.kind == "webdataset" and cfg.webdataset.seed is not None:
        return cfg.webdataset.seed
    return seed


def _shard_source(cfg: DataConfig, *, batch_size: int, seq_len: int, model_vocab: int, seed: int,
                  split: str, dp_rank: int, dp_size: int, start: Optional[dict]) -> BatchSource:
    from megatron_atlas.data.shards import LoaderState, ShardSource   # numpy/tarfile only when shards are used

    shards = cfg.shards
    name = shards.train_split if split == "train" else shards.val_split
    # Training order follows shards.seed (or train.seed); evaluation always reads the same batches.
    order_seed = train_order_seed(cfg, seed) if split == "train" else seed
    try:
        source = ShardSource(shards.path, name, batch_size=batch_size, seq_len=seq_len, seed=order_seed,
                             dp_rank=dp_rank, dp_size=dp_size,
                             start=LoaderState.from_dict(start) if start is not None else None)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"train.data.shards (path={shards.path!r}, split {name!r}): {e}") from None
    if source.vocab_size > model_vocab:
        raise ConfigError(f"the shards in {shards.path} use {source.vocab_size} token ids, more than "
                          f"model.vocab_size={model_vocab}; set model.vocab_size>={source.vocab_size}")
    return source


def _stream_source(cfg: DataConfig, *, batch_size: int, seq_len: int, model_vocab: int, seed: int,
                   split: str, dp_rank: int, dp_size: int, start: Optional[dict]) -> BatchSource:
    from megatron_atlas.data.stream import StreamingTextSource
    from megatron_atlas.data.tokenizer import Tokenizer

    wds = cfg.webdataset
    try:
        tokenizer = Tokenizer.from_file(wds.tokenizer)
    except Exception as e:   # tokenizers raises its own exception type for a bad file
        raise ConfigError(f"train.data.webdataset.tokenizer={wds.tokenizer!r}: {e}") from None
    if tokenizer.vocab_size > model_vocab:
        raise ConfigError(f"train.data.webdataset.tokenizer has {tokenizer.vocab_size} ids, more than "
                          f"model.vocab_size={model_vocab}")
    # evaluation: the held-out shards read from the start in one stream, the same batches every time
    urls, workers = (wds.urls, wds.workers) if split == "train" else (wds.val_urls, 0)
    try:
        return StreamingTextSource(urls, tokenizer, batch_size=batch_size, seq_len=seq_len,
                                   seed=train_order_seed(cfg, seed) if split == "train" else seed,
                                   dp_rank=dp_rank if split == "train" else 0,
                                   dp_size=dp_size if split == "train" else 1, workers=workers,
                                   text_field=wds.text_field, start=start if split == "train" else None)
    except ValueError as e:
        raise ConfigError(f"train.data.webdataset: {e}") from None
