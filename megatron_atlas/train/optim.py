"""AdamW with the usual decay rule: matrices (and higher) decay, vectors and scalars do not.

Weight decay applies to every parameter with >= 2 dimensions: projections, embeddings and the output
head (as in nanoGPT and Megatron), and the memory's learned initial weights. Norm gains, biases, gate
biases and the feature coefficients are 1-D and never decay: shrinking them towards 0 has no
regularising meaning and drags gates and norms away from their initialisation.
"""
from __future__ import annotations

import torch

from megatron_atlas.train.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # lr is set by the schedule before every step; fused kernels only where they exist.
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)
