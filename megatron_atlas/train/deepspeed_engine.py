"""Training through DeepSpeed: the engine, one optimizer step, and DeepSpeed checkpoints.

- ZeRO stage and communication knobs come from `configs/deepspeed/<name>.json`; batch sizes,
  gradient clipping and precision are filled in from the train config so the two can never
  disagree. bf16 is DeepSpeed's `torch_autocast` (fp32 module, gradients and reductions), the
  numerics of the native loop's autocast.
- The optimizer is the project's AdamW (its decay groups) passed as a client optimizer, which also
  runs on CPU; the learning rate follows the project's schedule, set before every step.
- A step whose loss or global grad norm is not finite on any rank is skipped inside the optimizer
  (`GuardedAdamW`, decided once for all parameter groups and ranks), because DeepSpeed would
  otherwise apply it to some groups at least.
- Loss scaling: DeepSpeed averages gradients over the DP group and divides the loss by the number
  of accumulation steps, so each rank back-propagates `its summed loss * dp * accum / labels in
  the global step`; the gradient is then exactly the one-process gradient of the global batch.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

import torch

from megatron_atlas.configs import deepspeed_config_path
from megatron_atlas.data.synthetic import IGNORE_INDEX
from megatron_atlas.parallel.state import ParallelState
from megatron_atlas.train.backends import StepResult
from megatron_atlas.train.config import ParallelConfig, TrainConfig
from megatron_atlas.train.distributed import all_reduce_sum
from megatron_atlas.train.guarded import GuardedAdamW, Norm
from megatron_atlas.train.loss import loss_sum
from megatron_atlas.train.mpu import DeepSpeedMPU
from megatron_atlas.train.optim import param_groups
from megatron_atlas.train.precision import uses_bf16

Batch = tuple[torch.Tensor, torch.Tensor]


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


def build_engine(model: torch.nn.Module, pcfg: ParallelConfig, cfg: TrainConfig, parallel: ParallelState,
                 device: torch.device):
    import deepspeed   # heavy; only for DeepSpeed runs

    optimizer = GuardedAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps)
    config = deepspeed_config(pcfg, cfg, parallel.dp_size, uses_bf16(device, cfg.precision))
    engine, _, _, _ = deepspeed.initialize(args=deepspeed_args(device), model=model, optimizer=optimizer,
                                           config=config, mpu=DeepSpeedMPU(parallel), dist_init_required=False)
    return engine, optimizer


def deepspeed_args(device: torch.device) -> Optional[argparse.Namespace]:
    """DeepSpeed puts the engine on CUDA device LOCAL_RANK unless told `device_rank`: under a
    Slurm GPU binding that device does not exist (the task's GPU is device 0), so pass the one
    `init_distributed` chose."""
    return argparse.Namespace(device_rank=device.index) if device.type == "cuda" else None


def unsharded_grad_norm(model: torch.nn.Module, parallel: ParallelState) -> torch.Tensor:
    """Global grad norm (on the device) when every rank holds whole (DP-averaged) gradients:
    TP-sharded parameters are summed over the TP group, replicated ones counted once."""
    sharded, replicated = [], []
    for p in model.parameters():
        if p.grad is not None:
            (sharded if getattr(p, "tensor_model_parallel", False) else replicated).append(p.grad)
    device = next(model.parameters()).device
    sq = [torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).square().sum()
          if grads else torch.zeros((), device=device) for grads in (sharded, replicated)]
    if parallel.tp_size > 1:
        sq[0] = all_reduce_sum(sq[0], parallel.tp_group)
    return (sq[0] + sq[1]).sqrt()


def _zero_grad_norm(engine) -> Norm:
    """The global grad norm a ZeRO optimizer computed over all groups and ranks in this step,
    before it steps any group (inf when it found a non-finite gradient)."""
    return engine.optimizer._global_grad_norm


def deepspeed_step(engine, optimizer: GuardedAdamW, micro_batches: Sequence[Batch], parallel: ParallelState,
                   lr: float) -> StepResult:
    """One optimizer step over this rank's micro-batches: the global mean loss and grad norm stay
    on the device (no host read per micro-batch or parameter); the only host read is the
    optimizer's skip decision. A skipped step changed no parameter on any rank."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    local = sum((labels != IGNORE_INDEX).sum() for _, labels in micro_batches)
    n_labels = all_reduce_sum(local, parallel.dp_group).clamp(min=1)
    scale = parallel.dp_size * len(micro_batches)   # undoes DeepSpeed's mean over DP and accumulation
    stage0 = engine.zero_optimization_stage() == 0
    total, norm = None, None
    for j, (input_ids, labels) in enumerate(micro_batches):
        loss = loss_sum(engine(input_ids), labels, parallel) / n_labels
        engine.backward(loss * scale)
        total = loss.detach() if total is None else total + loss.detach()
        if j == len(micro_batches) - 1:   # the accumulation boundary: engine.step() steps the optimizer
            if stage0:   # ZeRO-0 holds whole gradients and reports no norm
                norm = unsharded_grad_norm(engine.module, parallel)
            optimizer.arm((lambda: norm) if stage0 else (lambda: _zero_grad_norm(engine)), total)
        engine.step()
    if not stage0:
        norm = torch.as_tensor(engine.get_global_grad_norm(), dtype=torch.float32)
    return StepResult(all_reduce_sum(total, parallel.dp_group), norm, optimizer.skipped)
