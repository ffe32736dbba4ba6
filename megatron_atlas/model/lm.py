"""The causal LM: embeddings (+ optional persistent tokens) -> blocks -> norm -> LM head.

`step()` and `generate()` carry per-layer caches (memory state + KV window), so decoding memory is
constant in the context length and the logits equal those of the full forward pass.

Tensor parallel (`parallel.tp_size` > 1): the embedding and the LM head are vocab-parallel, so
`forward` returns this rank's LOCAL vocab shard of the logits [B, T, V/tp] (rank r holds ids
[r V/tp, (r+1) V/tp)); use `parallel.cross_entropy.vocab_parallel_cross_entropy` for the loss and
`parallel.layers.gather_logits` for full logits. With sequence parallelism the residual stream
between TP regions holds T/tp positions per rank. Decoding (`new_cache`/`step`/`generate`) is
single-process only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor, nn

from megatron_atlas.parallel.collectives import reduce_scatter_to_sequence_region
from megatron_atlas.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, enter_tp_region
from megatron_atlas.parallel.sharding import mark_sequence_parallel, shard_parameters_, tp_size_of
from megatron_atlas.parallel.state import ParallelConfigError, ParallelState

from .blocks import Block, BlockCache
from .config import ModelConfig
from .layers import RMSNorm

_FFN_MULTIPLE = 64


@dataclass
class LMCache:
    blocks: List[BlockCache]
    position: int = 0                 # tokens consumed so far (persistent tokens included)


class AtlasLM(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelState | None = None):
        super().__init__()
        if not cfg.ffn_hidden:
            raise ValueError("AtlasLM needs a resolved ffn_hidden; build it with build_model(cfg)")
        check_tensor_parallel(cfg, tp_size_of(parallel))
        self.cfg, self.parallel = cfg, parallel
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, parallel)
        self.persistent = nn.Parameter(torch.randn(cfg.n_persist, cfg.d_model) * cfg.init_std) \
            if cfg.n_persist else None
        if self.persistent is not None:  # under SP it enters through rank 0's term of a reduce-scatter
            mark_sequence_parallel(self.persistent, parallel)
        self.blocks = nn.ModuleList(Block(cfg, cfg.ffn_hidden, parallel) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        mark_sequence_parallel(self.norm.weight, parallel)
        self.lm_head = ColumnParallelLinear(cfg.d_model, cfg.vocab_size, parallel=parallel,
                                           input_in_region=True, what="model.vocab_size")
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        for block in self.blocks:
            nn.init.normal_(block.ffn.gate_up.weight, std=cfg.init_std)
            nn.init.normal_(block.ffn.down.weight, std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        shard_parameters_(self, parallel)  # full weights were initialised above: keep this rank's slice

    def _embed(self, input_ids: Tensor, prepend_persistent: bool) -> Tensor:
        x = self.embed(input_ids)
        if prepend_persistent and self.persistent is not None:
            x = torch.cat([self.persistent.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def _head(self, x: Tensor, drop: int) -> Tensor:
        # enter the LM head's TP region first: under SP the persistent positions to drop sit on
        # the first rank's shard, so they can only be dropped from the gathered sequence
        return self.lm_head(enter_tp_region(self.norm(x), self.parallel)[:, drop:])

    def _embed_sequence_shard(self, input_ids: Tensor) -> Tensor:
        """Sequence parallel: this rank's sequence shard of the embeddings (+ persistent tokens) with
        one reduce-scatter of the ranks' partial lookups. The persistent tokens are added by rank 0
        only (the others add zeros), so the sum is exact; their gradient is then on rank 0 alone
        and the `sequence_parallel` all-reduce of gradients completes it."""
        length, tp = input_ids.shape[1] + self.cfg.n_persist, self.parallel.tp_size
        if length % tp:
            raise ParallelConfigError(
                f"sequence parallel needs the sequence length ({input_ids.shape[1]} tokens + "
                f"{self.cfg.n_persist} persistent = {length}) divisible by tp={tp}")
        x = self.embed.partial(input_ids)
        if self.persistent is not None:
            own = self.persistent.to(x.dtype) * float(self.parallel.tp_rank == 0)
            x = torch.cat([own.expand(x.shape[0], -1, -1), x], dim=1)
        return reduce_scatter_to_sequence_region(x, self.parallel.tp_group)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (the local [B, T, vocab/tp] shard under TP)."""
        if self.parallel is not None and self.parallel.sequence_parallel and self.parallel.tp_size > 1:
            x = self._embed_sequence_shard(input_ids)
        else:
            x = self._embed(input_ids, prepend_persistent=True)
        for block in self.blocks:
            x, _ = block(x)
        return self._head(x, self.cfg.n_persist)

    def new_cache(self, batch_size: int, device=None, dtype=None) -> LMCache:
        if tp_size_of(self.parallel) > 1:
            raise ParallelConfigError(
                f"decoding (new_cache/step/generate) runs in one process; this model has "
                f"tp={self.parallel.tp_size}: gather a TP=1 state dict and build the model without `parallel`")
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return LMCache([block.new_cache(batch_size, device, dtype) for block in self.blocks])

    def step(self, input_ids: Tensor, cache: LMCache) -> Tensor:
        """Logits for the next tokens of a sequence whose earlier tokens went through `cache`."""
        if tp_size_of(self.parallel) > 1:
            raise ParallelConfigError(f"step() runs in one process; this model has tp={self.parallel.tp_size}")
        first = cache.position == 0
        x = self._embed(input_ids, prepend_persistent=first)
        for block, block_cache in zip(self.blocks, cache.blocks):
            x, _ = block(x, block_cache)
        cache.position += x.shape[1]
        return self._head(x, self.cfg.n_persist if first else 0)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Greedy (temperature 0) or sampled continuation; returns prompt + new tokens [B, T + new]."""
        cache = self.new_cache(input_ids.shape[0])
        logits = self.step(input_ids, cache)[:, -1]
        out = [input_ids]
        for _ in range(max_new_tokens):
            token = _sample(logits, temperature, top_k, generator)
            out.append(token)
            logits = self.step(token, cache)[:, -1]
        return torch.cat(out, dim=1)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters held by this process (this rank's shards under TP)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total


def _sample(logits: Tensor, temperature: float, top_k: Optional[int],
            generator: Optional[torch.Generator]) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def _count_on_meta(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return AtlasLM(cfg).num_parameters()


def resolve_ffn_hidden(cfg: ModelConfig) -> ModelConfig:
    """Fill in ffn_hidden=0: solve for target_params (the count is affine in the SwiGLU width),
    or use 8/3 d_model; rounded to a multiple of 64."""
    if cfg.ffn_hidden:
        return cfg
    if not cfg.target_params:
        hidden = _FFN_MULTIPLE * max(1, round(8 * cfg.d_model / 3 / _FFN_MULTIPLE))
        return dataclasses.replace(cfg, ffn_hidden=hidden)
    low, high = (_count_on_meta(dataclasses.replace(cfg, ffn_hidden=h)) for h in (_FFN_MULTIPLE, 2 * _FFN_MULTIPLE))
    per_unit = (high - low) / _FFN_MULTIPLE
    hidden = _FFN_MULTIPLE + (cfg.target_params - low) / per_unit
    return dataclasses.replace(cfg, ffn_hidden=_FFN_MULTIPLE * max(1, round(hidden / _FFN_MULTIPLE)))


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Refuse a config whose heads, kv heads, vocabulary or FFN width cannot be split tp ways."""
    if tp == 1:
        return
    sizes = {"model.n_heads": cfg.n_heads, "model.vocab_size": cfg.vocab_size,
             "model.ffn_hidden": cfg.ffn_hidden}
    if cfg.has_attention:
        sizes["model.attention.n_kv_heads"] = cfg.attention.n_kv_heads or cfg.n_heads
    bad = [f"{key}={value}" for key, value in sizes.items() if value % tp]
    if bad:
        raise ParallelConfigError(f"tensor parallel size tp={tp} must divide {', '.join(bad)}")


def build_model(cfg: ModelConfig, device=None, parallel: ParallelState | None = None) -> AtlasLM:
    """Validate `cfg`, resolve ffn_hidden, and build the model (on `device` if given).

    With `parallel` (tp > 1) every rank builds the same full weights from the same seed and keeps
    its tensor-parallel shard."""
    cfg = resolve_ffn_hidden(cfg.validate())
    if device is not None:
        with torch.device(device):
            return AtlasLM(cfg, parallel)
    return AtlasLM(cfg, parallel)
