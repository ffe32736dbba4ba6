"""The two ways one optimizer step runs: plain PyTorch in one process, or a DeepSpeed engine.

Both offer the same four things to the loop: `model` (for evaluation and counting), `step(micro
batches, lr) -> StepResult`, `save(out_dir, step, loader, config_yaml, keep_last)` and the resume
done when they are built (`start_step`, `loader`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_atlas.parallel.state import ParallelState
from megatron_atlas.train import checkpoint as ckpt
from megatron_atlas.train.config import ParallelConfig, TrainConfig
from megatron_atlas.train.distributed import barrier, is_main_process
from megatron_atlas.train.zero_to_fp32 import replace_recovery_scripts
from megatron_atlas.parallel.sharding import partition_dims, shard_state_dict

Batch = tuple[torch.Tensor, torch.Tensor]


class StepResult(NamedTuple):
    """One optimizer step. loss and grad_norm stay on the device, so the step needs no host read
    but its skip decision; the loop reads them once per log interval."""
    loss: torch.Tensor        # mean loss per labelled token of the global batch
    grad_norm: torch.Tensor   # global, before clipping
    skipped: bool             # the loss or the grad norm was not finite: no parameter changed


class NativeBackend:
    """One process, torch AdamW; checkpoints are one state.pt (bit-exact resume on CPU)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, autocast, resume: Optional[Path]) -> None:
        from megatron_atlas.train.optim import build_optimizer
        self.model, self.cfg, self.autocast = model, cfg, autocast
        self.optimizer = build_optimizer(model, cfg)
        self.step_model = torch.compile(model) if cfg.compile else model   # shares the parameters
        self.start_step, self.loader = 0, None
        if resume is not None:
            if ckpt.is_deepspeed_checkpoint(resume) and not (resume / ckpt.STATE_FILE).is_file():
                raise ValueError(f"{resume} is a DeepSpeed checkpoint: resume it with parallel.zero_stage>0 "
                                 f"or consolidate it first (tools/checkpoint_tool.py consolidate)")
            state = ckpt.load_checkpoint(resume)
            model.load_state_dict(state["model"])
            if "optimizer" in state:
                self.optimizer.load_state_dict(state["optimizer"])
            if "rng" in state:
                ckpt.set_rng_state(state["rng"])
            self.start_step, self.loader = state["step"], state["loader"]

    def step(self, micro_batches: Sequence[Batch], lr: float) -> StepResult:
        from megatron_atlas.train.loop import train_step
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return train_step(self.step_model, self.optimizer, micro_batches, self.cfg.grad_clip, self.autocast)

    def save(self, out_dir: Path, step: int, loader: dict, config_yaml: str, keep_last: int) -> Path:
        state = {"step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "rng": ckpt.rng_state(), "loader": loader}
        return ckpt.save_checkpoint(out_dir, step, state, config_yaml, keep_last)


class DeepSpeedBackend:
    """A DeepSpeed engine over the model (ZeRO 0-3, TP through the mpu adapter).

    Resume: a DeepSpeed checkpoint of the same layout (tp, dp, ZeRO stage) restores everything;
    a native or consolidated checkpoint (full state dict, any former layout) restores the weights
    (sliced to this TP rank), step and loader state, and the optimizer moments start fresh."""

    def __init__(self, model: torch.nn.Module, pcfg: ParallelConfig, cfg: TrainConfig, parallel: ParallelState,
                 device: torch.device, resume: Optional[Path], log: Callable[[str], None]) -> None:
        from megatron_atlas.train.deepspeed_engine import build_engine
        self.parallel, self.pcfg = parallel, pcfg
        self.layout = {"tp": parallel.tp_size, "cp": parallel.cp_size, "dp": parallel.dp_size,
                       "zero_stage": pcfg.zero_stage}
        self.dims = partition_dims(model)   # recorded in checkpoints for consolidation
        self.keys = list(model.state_dict())
        self.start_step, self.loader = 0, None
        native = resume is not None and not ckpt.is_deepspeed_checkpoint(resume)
        if native:   # before deepspeed.initialize: ZeRO-3 partitions the parameters there
            state = ckpt.load_checkpoint(resume)
            model.load_state_dict(shard_state_dict(state["model"], self.dims, parallel.tp_rank, parallel.tp_size))
            self.start_step, self.loader = state["step"], state["loader"]
            log(f"loaded the weights of {resume} (a full state dict) at tp rank {parallel.tp_rank}/"
                f"{parallel.tp_size}; optimizer moments start fresh")
        self.engine, self.optimizer = build_engine(model, pcfg, cfg, parallel, device)
        self.model = self.engine.module
        if resume is not None and not native:
            self._load_deepspeed(resume)

    def _load_deepspeed(self, path: Path) -> None:
        state = ckpt.load_deepspeed_state(path)   # verified and pickle-checked before DeepSpeed reads it
        if state["layout"] != self.layout:
            raise ValueError(f"{path} was written with layout {state['layout']}, this run is {self.layout}; "
                             f"consolidate it (tools/checkpoint_tool.py consolidate {path} OUT) and resume "
                             f"from OUT with train.resume=OUT")
        self.engine.load_checkpoint(str(path), tag=ckpt.DEEPSPEED_TAG, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
        ckpt.load_rank_rng(path, dist.get_rank())
        self.start_step, self.loader = state["step"], state["loader"]

    def step(self, micro_batches: Sequence[Batch], lr: float) -> StepResult:
        from megatron_atlas.train.deepspeed_engine import deepspeed_step
        return deepspeed_step(self.engine, self.optimizer, micro_batches, self.parallel, lr)

    def save(self, out_dir: Path, step: int, loader: dict, config_yaml: str, keep_last: int) -> Path:
        """Every rank writes its part into the temporary folder; rank 0 publishes it after a barrier."""
        tmp = ckpt.temporary_dir(out_dir, step)
        if is_main_process():
            ckpt.fresh_temporary_dir(out_dir, step)
        barrier()
        self.engine.save_checkpoint(str(tmp), tag=ckpt.DEEPSPEED_TAG, save_latest=False)
        ckpt.write_rank_rng(tmp, dist.get_rank())
        barrier()
        final = tmp.with_name(tmp.name[:-len(".tmp")])
        if is_main_process():
            state = {"step": step, "loader": loader, "layout": self.layout, "engine": "deepspeed",
                     "partition_dims": self.dims, "state_dict_keys": self.keys}
            torch.save(state, tmp / ckpt.DEEPSPEED_STATE_FILE)
            ckpt.fsync_path(tmp / ckpt.DEEPSPEED_STATE_FILE)
            replace_recovery_scripts(tmp)
            ckpt.publish_checkpoint(tmp, config_yaml, keep_last)
        barrier()
        return final
