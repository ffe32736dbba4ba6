"""Learning-rate schedules as pure functions of the step, so a resumed run needs only the step.

All schedules warm up linearly over `warmup_steps` (step 0 already trains at lr / warmup_steps);
afterwards:
- cosine:   half a cosine from lr down to lr * min_lr_ratio at the last step;
- wsd:      warmup-stable-decay: lr until the last `decay_fraction` of the steps, then linear down
            to lr * min_lr_ratio;
- constant: lr.
"""
from __future__ import annotations

import math

from megatron_atlas.train.config import TrainConfig


def lr_factor(step: int, steps: int, schedule: str, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
              decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak lr at 0-based `step` of a run of `steps` steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, steps - 1 - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "wsd":
        decay_start = max(warmup_steps, steps - round(decay_fraction * steps))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / max(1, steps - decay_start)
        return 1.0 - (1 - min_lr_ratio) * min(1.0, progress)
    raise ValueError(f"unknown schedule {schedule!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * lr_factor(step, cfg.steps, cfg.schedule, cfg.warmup_steps, cfg.min_lr_ratio,
                              cfg.decay_fraction)
