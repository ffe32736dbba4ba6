"""Start the process group and the tp-cp-dp layout of a run, and the few reductions the loop needs.

`python -m megatron_atlas.train` under torchrun or srun finds RANK/WORLD_SIZE (or SLURM_*) in the
environment; a single process with a DeepSpeed engine gets a one-rank group of its own.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from megatron_atlas.model.config import ConfigError
from megatron_atlas.parallel.launch_env import launch_from_env
from megatron_atlas.parallel.state import (ParallelConfigError, ParallelState, build_parallel_state,
                                           init_distributed)
from megatron_atlas.train.config import ParallelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world_size() -> int:
    launch = launch_from_env(os.environ)
    return 1 if launch is None else launch.world_size


def uses_deepspeed(cfg: ParallelConfig, world_size: int) -> bool:
    """engine=auto: plain PyTorch for exactly one process without ZeRO, DeepSpeed otherwise."""
    if cfg.engine == "native" and world_size > 1:
        raise ConfigError(f"parallel.engine=native trains in one process, but {world_size} were launched; "
                          "use parallel.engine=auto")
    if cfg.engine == "auto":
        return world_size > 1 or cfg.zero_stage > 0 or cfg.tp > 1 or cfg.cp > 1
    return cfg.engine == "deepspeed"


def setup_parallel(cfg: ParallelConfig, deepspeed: bool) -> ParallelState:
    """Initialise torch.distributed (if launched so, or for a one-process DeepSpeed run) and build
    the groups. A layout that does not fit the world size is a ConfigError naming the numbers."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")   # before deepspeed is first imported
    if deepspeed and launched_world_size() == 1 and not dist.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    init_distributed()
    try:
        return build_parallel_state(cfg.tp, cfg.cp, cfg.sequence_parallel)
    except ParallelConfigError as e:
        raise ConfigError(str(e)) from None


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(value: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over `group` (no-op without a process group); returns a new tensor."""
    if not dist.is_initialized():
        return value.clone()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    reduced = value.to(device, copy=True)
    dist.all_reduce(reduced, group=group)
    return reduced.to(value.device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
