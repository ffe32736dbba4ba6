"""Training through DeepSpeed: the engine, one optimizer step, and DeepSpeed checkpoints.

- ZeRO stage and communication knobs come from `configs/deepspeed/<name>.json`; batch sizes,
  gradient clipping and precision are filled in from the train config so the two can never
  disagree. bf16 is DeepSpeed's `torch_autocast` (fp32 module, gradients and reductions), the
  numerics of the native loop's autocast.
- The optimizer is the project's AdamW (its decay groups) passed as a client optimizer, which also
  runs on CPU; the learning rate follows the project's schedule, set before every step.
- A step whose gradients are not finite on any rank is skipped inside the optimizer
  (`GuardedAdamW`), because DeepSpeed (fp32/bf16) would otherwise apply it.
- Loss scaling: DeepSpeed averages gradients over the DP group and divides the loss by the number
  of accumulation steps, so each rank back-propagates `its summed loss * dp * accum / labels in
  the global step`; the gradient is then exactly the one-process gradient of the global batch.
"""
from __future__ import annotations

import json
import math
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_atlas.configs import deepspeed_config_path
from megatron_atlas.data.synthetic import IGNORE_INDEX
from megatron_atlas.parallel.state import ParallelState
from megatron_atlas.train.config import ParallelConfig, TrainConfig
from megatron_atlas.train.distributed import all_reduce_sum
from megatron_atlas.train.loss import loss_sum
from megatron_atlas.train.mpu import DeepSpeedMPU
from megatron_atlas.train.optim import param_groups
from megatron_atlas.train.precision import uses_bf16

Batch = tuple[torch.Tensor, torch.Tensor]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its step (on every rank together) when any rank holds a non-finite gradient.

    DeepSpeed calls `step` on every rank at the same point (each on its own ZeRO partition), so the
    all-reduce of the flag here is safe; the parameters then stay those before the bad batch."""

    skipped = False

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        bad = torch.zeros((), device=device)
        for g in grads:
            bad += (~torch.isfinite(g)).any()
        if dist.is_initialized():
            dist.all_reduce(bad)
        self.skipped = bool(bad.item() > 0)
        return None if self.skipped else super().step(closure)


def deepspeed_config(pcfg: ParallelConfig, cfg: TrainConfig, dp_size: int, bf16: bool) -> dict:
    ds = json.loads(deepspeed_config_path(pcfg.deepspeed_config_name).read_text())
    stage = ds.setdefault("zero_optimization", {}).setdefault("stage", pcfg.zero_stage)
    if stage != pcfg.zero_stage:
        raise ValueError(f"parallel.deepspeed={pcfg.deepspeed_config_name} sets ZeRO stage {stage} but "
                         f"parallel.zero_stage={pcfg.zero_stage}")
    ds.update(train_micro_batch_size_per_gpu=cfg.micro_batch_size,
              gradient_accumulation_steps=cfg.grad_accum,
              train_batch_size=cfg.micro_batch_size * cfg.grad_accum * dp_size,
              gradient_clipping=cfg.grad_clip,
              zero_allow_untested_optimizer=True)
    # bf16 as torch autocast, exactly as the native loop runs it: the module, its gradients (and
    # their accumulation over micro-batches), the DP reduction and the optimizer stay fp32. DeepSpeed's
    # own `bf16` mode would cast the whole module to bf16 and accumulate gradients in bf16.
    ds["bf16"] = {"enabled": False}
    ds["fp16"] = {"enabled": False}
    ds["torch_autocast"] = {"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


def mark_sequence_parallel_grads(model: torch.nn.Module, parallel: ParallelState) -> None:
    """Parameters replicated over TP but fed only this rank's sequence shard (`sequence_parallel`
    attribute) need their gradient summed over the TP group. A hook on the parameter does it as the
    gradient is produced, before any ZeRO stage moves it into its buckets."""
    if not parallel.sequence_parallel or parallel.tp_size == 1:
        return
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.requires_grad:
            p.register_hook(lambda g: _all_reduced(g, parallel.tp_group))


def _all_reduced(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.contiguous().clone()
    dist.all_reduce(grad, group=group)
    return grad


def build_engine(model: torch.nn.Module, pcfg: ParallelConfig, cfg: TrainConfig, parallel: ParallelState,
                 device: torch.device):
    import deepspeed   # heavy; only for DeepSpeed runs

    mark_sequence_parallel_grads(model, parallel)
    optimizer = GuardedAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps)
    config = deepspeed_config(pcfg, cfg, parallel.dp_size, uses_bf16(device, cfg.precision))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           mpu=DeepSpeedMPU(parallel), dist_init_required=False)
    return engine, optimizer


def unsharded_grad_norm(model: torch.nn.Module, parallel: ParallelState) -> float:
    """Global grad norm when every rank holds whole (DP-averaged) gradients: TP-sharded parameters
    are summed over the TP group, replicated ones counted once."""
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if parallel.tp_size > 1:
        sharded = all_reduce_sum(sharded, parallel.tp_group)
    return float((sharded + replicated).sqrt())


def deepspeed_step(engine, optimizer: GuardedAdamW, micro_batches: Sequence[Batch], parallel: ParallelState,
                   lr: float) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches; returns (global mean loss, grad norm).
    A skipped step (non-finite gradients somewhere) reports a non-finite grad norm."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    local = sum((labels != IGNORE_INDEX).sum() for _, labels in micro_batches)
    n_labels = float(all_reduce_sum(torch.as_tensor(local, dtype=torch.float64), parallel.dp_group))
    scale = parallel.dp_size * len(micro_batches)   # undoes DeepSpeed's mean over DP and accumulation
    total = torch.zeros((), dtype=torch.float64)
    norm = None
    for j, (input_ids, labels) in enumerate(micro_batches):
        loss = loss_sum(engine(input_ids), labels, parallel) / max(1.0, n_labels)
        engine.backward(loss * scale)
        if j == len(micro_batches) - 1 and engine.zero_optimization_stage() == 0:
            norm = unsharded_grad_norm(engine.module, parallel)   # ZeRO-0 does not report it
        engine.step()
        total += loss.detach().double().cpu()
    loss = float(all_reduce_sum(total, parallel.dp_group))
    norm = engine.get_global_grad_norm() if norm is None else norm
    grad_norm = math.nan if optimizer.skipped else float(norm if norm is not None else math.nan)
    return loss, grad_norm
