"""The causal LM: embeddings (+ optional persistent tokens) -> blocks -> norm -> LM head.

`step()` and `generate()` carry per-layer caches (memory state + KV window), so decoding memory is
constant in the context length and the logits equal those of the full forward pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor, nn

from .blocks import Block, BlockCache
from .config import ModelConfig
from .layers import RMSNorm

_FFN_MULTIPLE = 64


@dataclass
class LMCache:
    blocks: List[BlockCache]
    position: int = 0                 # tokens consumed so far (persistent tokens included)


class AtlasLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.ffn_hidden:
            raise ValueError("AtlasLM needs a resolved ffn_hidden; build it with build_model(cfg)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.persistent = nn.Parameter(torch.randn(cfg.n_persist, cfg.d_model) * cfg.init_std) \
            if cfg.n_persist else None
        self.blocks = nn.ModuleList(Block(cfg, cfg.ffn_hidden) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        for block in self.blocks:
            nn.init.normal_(block.ffn.gate_up.weight, std=cfg.init_std)
            nn.init.normal_(block.ffn.down.weight, std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _embed(self, input_ids: Tensor, prepend_persistent: bool) -> Tensor:
        x = self.embed(input_ids)
        if prepend_persistent and self.persistent is not None:
            x = torch.cat([self.persistent.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def _head(self, x: Tensor, drop: int) -> Tensor:
        return self.lm_head(self.norm(x[:, drop:]))

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]."""
        x = self._embed(input_ids, prepend_persistent=True)
        for block in self.blocks:
            x, _ = block(x)
        return self._head(x, self.cfg.n_persist)

    def new_cache(self, batch_size: int, device=None, dtype=None) -> LMCache:
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return LMCache([block.new_cache(batch_size, device, dtype) for block in self.blocks])

    def step(self, input_ids: Tensor, cache: LMCache) -> Tensor:
        """Logits for the next tokens of a sequence whose earlier tokens went through `cache`."""
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


def build_model(cfg: ModelConfig, device=None) -> AtlasLM:
    """Validate `cfg`, resolve ffn_hidden, and build the model (on `device` if given)."""
    cfg = resolve_ffn_hidden(cfg.validate())
    if device is not None:
        with torch.device(device):
            return AtlasLM(cfg)
    return AtlasLM(cfg)
