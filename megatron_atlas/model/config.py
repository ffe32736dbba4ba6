"""Typed model configuration shared by the model, the YAML configs and the tools.

The dataclasses double as omegaconf structured-config schemas, so an unknown key or a value of the
wrong type is rejected when configs are composed; `validate()` checks the allowed values and the
relations between fields and names the offending key in its message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from kernels.memory.types import KINDS as MEMORY_KINDS, LOSSES as MEMORY_LOSSES, RULES as MEMORY_RULES

BLOCKS = ("lmm", "mag", "mal", "swa", "attn")
# Default per-head key width under polynomial features, whose width D = C(d_k + p, p) grows fast
# with d_k: half the head width, at most POLY_KEY_DIM (D = 153 at p = 2). 32 (D = 561) made a degree-2
# memory layer 3-4x a Titans layer's time at 170M width; the papers do not state their key width.
POLY_KEY_DIM = 16
# Widest polynomial feature map accepted: the memory state and its per-chunk updates scale with it.
MAX_FEATURE_WIDTH = 1 << 16


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the key."""


def _check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _check_positive(key: str, value, minimum: int = 1) -> None:
    if value is None or value < minimum:
        raise ConfigError(f"{key}={value!r} must be >= {minimum}")


@dataclass
class MemoryLayerConfig:
    """The learned test-time memory of a memory layer (DESIGN section 2 and 3)."""

    kind: str = "mlp"            # linear | mlp | gated_mlp
    rule: str = "gd"             # gd (Titans / OmegaNet) | muon (Atlas: NS on every token's momentum) |
                                 # muon_block (NS once per ns_block tokens; = muon at ns_block 1)
    loss: str = "l2"             # l2 | dot (DLA)
    window: int = 1              # Omega window c
    chunk: int = 16              # chunk size b of the parallel form
    degree: int = 1              # polynomial feature degree p
    ns_steps: int = 5            # Newton-Schulz steps for the muon rules
    ns_block: int = 1            # muon_block: tokens per orthogonalisation (divides chunk or a multiple of it)
    anchor: bool = True          # retention decays the fast weights towards their learned initial
                                 # values W0 (stable past the training length), False: towards zero
    key_dim: Optional[int] = None   # per-head d_k of q, k; None = head_dim (degree 1) or
                                    # min(head_dim / 2, 16) (degree > 1: features grow as d_k^p)
    expansion: int = 4           # hidden width of an MLP memory = expansion * head_dim
    momentum: bool = True        # False drops the momentum gate theta (DLA-style rule)
    max_lr: float = 0.01         # eta = sigmoid(.) * max_lr; 0.1 and 0.03 let tiny Titans diverge (README)
    conv_width: int = 4          # causal depthwise conv on q, k, v
    impl: str = "auto"           # memory operator implementation

    def validate(self, prefix: str = "model.memory") -> None:
        _check_choice(f"{prefix}.kind", self.kind, MEMORY_KINDS)
        _check_choice(f"{prefix}.rule", self.rule, MEMORY_RULES)
        _check_choice(f"{prefix}.loss", self.loss, MEMORY_LOSSES)
        _check_choice(f"{prefix}.impl", self.impl, ("auto", "reference", "chunked", "triton"))
        _check_positive(f"{prefix}.window", self.window)
        _check_positive(f"{prefix}.chunk", self.chunk)
        _check_positive(f"{prefix}.degree", self.degree)
        _check_positive(f"{prefix}.ns_steps", self.ns_steps)
        _check_positive(f"{prefix}.ns_block", self.ns_block)
        if self.rule == "muon_block" and self.ns_block % self.chunk and self.chunk % self.ns_block:
            raise ConfigError(f"{prefix}.ns_block={self.ns_block} must divide {prefix}.chunk={self.chunk} or be a "
                              "multiple of it")
        _check_positive(f"{prefix}.expansion", self.expansion)
        _check_positive(f"{prefix}.conv_width", self.conv_width)
        if self.key_dim is not None:
            _check_positive(f"{prefix}.key_dim", self.key_dim)
        if not 0.0 < self.max_lr <= 10.0:
            raise ConfigError(f"{prefix}.max_lr={self.max_lr!r} must be in (0, 10]")


@dataclass
class AttentionConfig:
    """Causal attention branch: sliding-window (SWA) or full (Transformer baseline)."""

    window: int = 512            # w: each query sees itself and the w-1 tokens before it
    n_kv_heads: Optional[int] = None   # GQA; None = n_heads
    rope_theta: float = 10000.0
    backend: str = "auto"        # auto | flash | sdpa | blockwise

    def validate(self, n_heads: int, prefix: str = "model.attention") -> None:
        _check_positive(f"{prefix}.window", self.window)
        _check_choice(f"{prefix}.backend", self.backend, ("auto", "flash", "sdpa", "blockwise"))
        if self.n_kv_heads is not None:
            _check_positive(f"{prefix}.n_kv_heads", self.n_kv_heads)
            if n_heads % self.n_kv_heads:
                raise ConfigError(
                    f"{prefix}.n_kv_heads={self.n_kv_heads} must divide model.n_heads={n_heads}")
        if self.rope_theta <= 0:
            raise ConfigError(f"{prefix}.rope_theta={self.rope_theta!r} must be > 0")


@dataclass
class ModelConfig:
    """A causal LM built from one block type repeated `n_layers` times."""

    preset: str = "atlas"
    block: str = "lmm"           # lmm | mag | mal | swa | attn
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    head_dim: Optional[int] = None     # None = d_model // n_heads
    ffn_hidden: int = 0          # SwiGLU hidden width; 0 = solve for target_params (or 8/3 d)
    target_params: int = 0       # total parameter count that ffn_hidden=0 aims at; 0 = none
    n_persist: int = 0           # learned persistent tokens prepended to every sequence
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02
    memory: MemoryLayerConfig = field(default_factory=MemoryLayerConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def mem_key_dim(self) -> int:
        if self.memory.key_dim is not None:
            return self.memory.key_dim
        if self.memory.degree > 1:
            return max(1, min(self.resolved_head_dim // 2, POLY_KEY_DIM))
        return self.resolved_head_dim

    @property
    def has_memory(self) -> bool:
        return self.block in ("lmm", "mag", "mal")

    @property
    def has_attention(self) -> bool:
        return self.block in ("mag", "mal", "swa", "attn")

    def validate(self) -> "ModelConfig":
        _check_choice("model.block", self.block, BLOCKS)
        for key in ("vocab_size", "d_model", "n_layers", "n_heads"):
            _check_positive(f"model.{key}", getattr(self, key))
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "set model.head_dim explicitly")
        if self.head_dim is not None:
            _check_positive("model.head_dim", self.head_dim)
        for key in ("ffn_hidden", "target_params", "n_persist"):
            _check_positive(f"model.{key}", getattr(self, key), minimum=0)
        self.memory.validate()
        self.attention.validate(self.n_heads)
        if self.has_memory and self.memory.degree > 1:
            width = math.comb(self.mem_key_dim + self.memory.degree, self.memory.degree)  # features.feature_dim
            if width > MAX_FEATURE_WIDTH:
                raise ConfigError(
                    f"model.memory.degree={self.memory.degree} with key width {self.mem_key_dim} (model.memory."
                    f"key_dim) gives polynomial features of width C({self.mem_key_dim}+{self.memory.degree}, "
                    f"{self.memory.degree}) = {width:,}; the memory's state grows with it (the tiny model at "
                    f"width 125,970 asks for 2 GB in one allocation). Keep it <= {MAX_FEATURE_WIDTH:,}: lower "
                    "model.memory.degree or model.memory.key_dim")
        return self
