"""Activation checkpointing per block: keep only each block's input, recompute the rest in backward.

The block's `forward` is wrapped on the instance, so module names and state dicts do not change
(checkpoints stay interchangeable with runs that do not recompute)."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Wrap every block of `model.blocks`; returns how many were wrapped."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` to checkpoint")
    for block in blocks:
        plain = block.forward

        def recomputed(*args, _plain=plain, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)
        block.forward = recomputed
    return len(blocks)
