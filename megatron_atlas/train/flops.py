"""Training FLOPs per token, counted from what the model actually executes, and MFU.

`6N` misses what makes these models different: the memory operator's inner update (chunk-start
forward and back-propagation, state reads and updates, and under `muon` Newton-Schulz on every
token's momentum) and the attention window. So the forward pass of one block and of the LM head is
run forward and backward on the meta device (shapes only, no memory, no arithmetic) under
`FlopCounterMode` at the run's sequence length; all blocks of a model are alike, so one block is
counted and multiplied. The backward is counted, not assumed to be 2x the forward: in the chunked
memory operator it is not.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_atlas.model.blocks import Block
from megatron_atlas.model.config import ModelConfig


def _train_flops(module: torch.nn.Module, batch_input: torch.Tensor) -> int:
    batch_input.requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        out = module(batch_input)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    return counter.get_total_flops()


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token of a sequence of `seq_len` tokens (cfg with ffn_hidden
    resolved, e.g. `model.cfg` of a built model)."""
    with torch.device("meta"):
        block = Block(cfg, cfg.ffn_hidden)
        head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        block_flops = _train_flops(block, torch.empty(1, seq_len + cfg.n_persist, cfg.d_model))
        head_flops = _train_flops(head, torch.empty(1, seq_len, cfg.d_model))
    return (cfg.n_layers * block_flops + head_flops) / seq_len


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation in [0, 1]; 0 when no peak is configured."""
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12) if peak_tflops > 0 else 0.0
