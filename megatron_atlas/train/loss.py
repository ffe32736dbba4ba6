"""The training and evaluation loss: summed token cross entropy over the labelled positions."""
from __future__ import annotations

import torch

from megatron_atlas.data.synthetic import IGNORE_INDEX
from megatron_atlas.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_atlas.parallel.state import ParallelState


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, parallel: ParallelState | None = None) -> torch.Tensor:
    """Summed cross entropy (fp32, computed chunk by chunk whatever the logits' dtype) over labelled
    positions; under TP the logits are this rank's vocab shard and the sum is the global one."""
    return vocab_parallel_cross_entropy(logits, labels, parallel, ignore_index=IGNORE_INDEX).sum()
