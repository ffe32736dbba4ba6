"""Typed data configuration: which batch source feeds training and evaluation.

`kind` selects the source and each kind keeps its own knobs in its own sub-section, so adding a
source (e.g. `shards`) means adding one dataclass field here and one entry in `data.sources`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_atlas.model.config import ConfigError, _check_choice, _check_positive

# data kind -> the DataConfig field that holds its knobs
DATA_SECTIONS = {"synthetic_mqar": "mqar", "shards": "shards", "webdataset": "webdataset"}
DATA_KINDS = tuple(DATA_SECTIONS)
# kinds whose source keeps its own loader state (`state(k).to_dict()`), resumed from `start`
STATEFUL_KINDS = ("shards", "webdataset")


@dataclass
class MQARDataConfig:
    """Multi-query associative recall (zoology style), generated on the fly from a seed."""

    vocab_size: Optional[int] = None   # None = model.vocab_size; keys use the lower half, values the upper
    num_kv_pairs: int = 8
    power_a: float = 0.01              # query gaps ~ a * g^(a-1): small a favours short gaps
    random_non_queries: bool = True    # filler tokens random (True) or 0 (False)

    def validate(self, prefix: str) -> None:
        if self.vocab_size is not None:
            _check_positive(f"{prefix}.vocab_size", self.vocab_size, minimum=4)
        _check_positive(f"{prefix}.num_kv_pairs", self.num_kv_pairs)
        if not 0.0 < self.power_a <= 1.0:
            raise ConfigError(f"{prefix}.power_a={self.power_a!r} must be in (0, 1]")


@dataclass
class ShardsDataConfig:
    """Token shards written by tools/prepare_data.py (format: data/shard_format.py)."""

    path: str = ""                     # the folder holding index.json
    train_split: str = "train"
    val_split: str = "val"             # evaluation batches come from this split
    seed: Optional[int] = None         # sample order; None = train.seed

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise ConfigError(f"{prefix}.path must name a shard folder (made by tools/prepare_data.py)")
        if not self.train_split or not self.val_split:
            raise ConfigError(f"{prefix}.train_split and {prefix}.val_split must not be empty")


@dataclass
class WebDatasetDataConfig:
    """Webdataset shards of raw text, tokenized while training (data/stream.py): for corpora too
    large to pre-tokenize. URLs as prepare_data takes them (local, pipe:, http(s)://, {a..b})."""

    urls: List[str] = field(default_factory=list)       # training shards
    val_urls: List[str] = field(default_factory=list)   # evaluation batches are read from these
    tokenizer: str = ""                # a tokenizer.json (e.g. one prepare_data wrote)
    seed: Optional[int] = None         # shard order; None = train.seed
    workers: int = 0                   # DataLoader workers per rank (0: read in the training process)
    text_field: str = "text"           # field of a sample's .json member holding the text

    def validate(self, prefix: str) -> None:
        if not self.urls:
            raise ConfigError(f"{prefix}.urls must list the training shards (paths, pipe:, http(s)://, {{a..b}})")
        if not self.val_urls:
            raise ConfigError(f"{prefix}.val_urls must list held-out shards for the evaluation batches")
        if not self.tokenizer:
            raise ConfigError(f"{prefix}.tokenizer must name a tokenizer.json")
        _check_positive(f"{prefix}.workers", self.workers, minimum=0)


@dataclass
class DataConfig:
    kind: str = "synthetic_mqar"
    eval_seed: int = 1_000_003         # held-out stream: training batches come from train.seed
    eval_batches: int = 4              # evaluation batches of train.micro_batch_size sequences
    allow_data_change: bool = False    # resume a checkpoint recorded on other data (data/identity.py)
    mqar: MQARDataConfig = field(default_factory=MQARDataConfig)
    shards: ShardsDataConfig = field(default_factory=ShardsDataConfig)
    webdataset: WebDatasetDataConfig = field(default_factory=WebDatasetDataConfig)

    def validate(self, prefix: str = "train.data") -> None:
        _check_choice(f"{prefix}.kind", self.kind, DATA_KINDS)
        _check_positive(f"{prefix}.eval_batches", self.eval_batches)
        # Only the selected kind's section has to make sense; another kind's settings are a mistake
        # (e.g. a shard path given without kind=shards would train on MQAR instead).
        section = DATA_SECTIONS[self.kind]
        getattr(self, section).validate(f"{prefix}.{section}")
        for kind, name, value in (("shards", "shards.path", self.shards.path),
                                  ("webdataset", "webdataset.urls", self.webdataset.urls)):
            if value and self.kind != kind:
                raise ConfigError(f"{prefix}.{name} is set but {prefix}.kind={self.kind}: set "
                                  f"{prefix}.kind={kind} to read it, or remove {prefix}.{name}")
