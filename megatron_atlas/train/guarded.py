"""AdamW whose optimizer step is all or nothing, decided once per step for every group and rank.

DeepSpeed calls the client optimizer's `step` once per parameter group (ZeRO-1/2) or sub-group
(ZeRO-3), each time with `param_groups` narrowed to that group and only that group's gradient
in place, after it has computed the global grad norm over all groups (and all ranks). A check of
the gradients `step` sees would decide per group: with one non-finite group the others would
still step, unclipped (the clip factor of a nan norm is no factor).

So the decision is taken once: `arm(norm, loss)` before `engine.step()` at the accumulation
boundary; the first `step` call then reads the global grad norm `norm()` and the step's loss and
decides, for all ranks together (one all-reduce of a flag), whether this step is finite; every
later call of the same step follows that decision. `skipped` says whether the parameters stayed
as they were (also when DeepSpeed skipped the step itself and never called `step`).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

Norm = Union[torch.Tensor, float, None]


class GuardedAdamW(torch.optim.AdamW):
    skipped = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._norm: Optional[Callable[[], Norm]] = None
        self._loss: Optional[torch.Tensor] = None
        self._skip: Optional[bool] = None

    def arm(self, norm: Callable[[], Norm], loss: torch.Tensor) -> None:
        """Start an optimizer step: `norm()` gives the global grad norm once DeepSpeed computed it
        (read at the first `step` call); `loss` is this rank's loss of the step (on the device)."""
        self._norm, self._loss, self._skip = norm, loss.detach(), None
        self.skipped = True   # until a group steps

    def _decide(self) -> bool:
        if self._norm is None:
            raise RuntimeError("GuardedAdamW.step() before arm(): the training step must arm the "
                               "optimizer at the accumulation boundary")
        norm = self._norm()
        if norm is None:
            raise RuntimeError("DeepSpeed computed no global grad norm for this step (is "
                               "zero_optimization.compute_grad_norm false?); GuardedAdamW needs it")
        loss = self._loss
        norm = torch.as_tensor(norm, dtype=torch.float32).to(loss.device)
        bad = (~torch.isfinite(norm) | ~torch.isfinite(loss)).float()
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                bad = bad.cuda()
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item())   # the step's one host read

    def step(self, closure=None):
        if self._skip is None:
            self._skip = self._decide()
        if self._skip:
            return None
        self.skipped = False
        return super().step(closure)
