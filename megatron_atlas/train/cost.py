"""What a training run will cost before it starts: FLOPs per token and peak memory per GPU.

FLOPs come from `flops.training_flops_per_token` (the model's own ops, counted on the meta device).
Memory is estimated the same way, without allocating anything: one block's forward runs on the
meta device under saved-tensor hooks, which see every tensor autograd keeps for the backward (the
memory operator's too: it saves through `save_for_backward`), and the run's peak is

    weights, AdamW moments and gradients (16 bytes per parameter) + the bf16 weight casts of autocast
    + activations: without checkpointing, every block's saved tensors; with per-block
      checkpointing, every block's input plus one block's saved tensors (the one recomputed)
    + the LM head and loss: logits, their fp32 copy and their gradient.

The estimate is validated against a measured CPU run in tests/test_cost.py (within 25%).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_atlas.model.blocks import Block
from megatron_atlas.model.config import ModelConfig

GIB = 1024 ** 3


def saved_bytes(module: torch.nn.Module, batch_input: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward of `module(batch_input)`,
    leaving out the parameters and the input (they exist whether or not autograd keeps them)."""
    storages: dict[int, int] = {}
    owned = {p.untyped_storage()._cdata for p in module.parameters()} | {batch_input.untyped_storage()._cdata}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in owned:
            storages[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _fused_attention_memory():
        module(batch_input.requires_grad_(True))
    return sum(storages.values())


class _FusedAttentionMemory(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while counting: on the meta device SDPA takes its
    math path and saves the T x T probabilities, which the fused kernels a GPU (and the CPU) run
    never keep; they save q, k, v, the output and one log-sum-exp per query."""

    @staticmethod
    def forward(ctx, q, k, v, lse):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):   # pragma: no cover - counting runs no backward
        raise NotImplementedError


@contextlib.contextmanager
def _fused_attention_memory():
    plain = F.scaled_dot_product_attention

    def counted(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None:   # masked calls (short sequences, decoding) keep their real cost
            return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)
        return _FusedAttentionMemory.apply(q, k, v, q.new_empty(q.shape[:-1], dtype=torch.float32))

    F.scaled_dot_product_attention = counted
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


@dataclass
class MemoryEstimate:
    """Bytes per GPU at the peak of a training step (micro-batch `batch` x `seq_len` tokens)."""

    parameters: int
    weights_and_optimizer: int     # fp32 weights, two AdamW moments, bf16 casts
    activations: int               # what the forward keeps for the backward
    gradients: int                 # fp32 parameter gradients
    head_and_loss: int             # logits, fp32 copy, gradient
    per_layer_saved: int           # one block's saved tensors (a layer's share without checkpointing)

    @property
    def total(self) -> int:
        return self.weights_and_optimizer + self.gradients + self.activations + self.head_and_loss


def estimate_training_memory(cfg: ModelConfig, seq_len: int, batch: int = 1, checkpointing: bool = True,
                             bf16: bool = True, parameters: Optional[int] = None) -> MemoryEstimate:
    """The peak memory of one training step of `cfg` (ffn_hidden resolved), per GPU without TP/ZeRO."""
    activation_dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.device("meta"):
        block = Block(cfg, cfg.ffn_hidden).to(activation_dtype)
        layer = saved_bytes(block, torch.empty(batch, seq_len + cfg.n_persist, cfg.d_model, dtype=activation_dtype))
        if parameters is None:
            from megatron_atlas.model import build_model
            parameters = build_model(cfg).num_parameters()
    width = 2 if bf16 else 4
    weights = parameters * (12 + (2 if bf16 else 0))
    residual = batch * (seq_len + cfg.n_persist) * cfg.d_model * 4    # the fp32 residual stream at a block input
    activations = cfg.n_layers * residual + layer if checkpointing else cfg.n_layers * layer
    logits = batch * seq_len * cfg.vocab_size
    head = logits * (width + 4 + 4)                                   # logits, fp32 copy, gradient
    return MemoryEstimate(parameters, weights, activations, 4 * parameters, head, layer)
