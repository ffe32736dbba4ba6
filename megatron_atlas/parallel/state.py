"""Process groups in the order tp-cp-dp (TP innermost), passed explicitly to every module.

Global rank = (dp_rank * cp_size + cp_rank) * tp_size + tp_rank, so a TP group is a run of adjacent
ranks (one node's fast links) and DP groups stride across nodes, as in Megatron-LM.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .launch_env import cuda_ordinal, export_launch, launch_from_env, node_gpu_count


class ParallelConfigError(ValueError):
    """A parallel layout that cannot be built; the message names the numbers involved."""


@dataclass(frozen=True)
class ParallelState:
    """Ranks, sizes and groups of one process. `None` groups mean a single process."""

    tp_size: int = 1
    cp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    cp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    model_parallel_group: dist.ProcessGroup | None = None  # tp x cp: the ranks holding one model replica
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp_size * self.cp_size * self.dp_size

    @property
    def global_rank(self) -> int:
        return (self.dp_rank * self.cp_size + self.cp_rank) * self.tp_size + self.tp_rank

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def describe(self) -> str:
        sp = " +SP" if self.sequence_parallel else ""
        return (f"tp={self.tp_rank}/{self.tp_size}{sp} cp={self.cp_rank}/{self.cp_size} "
                f"dp={self.dp_rank}/{self.dp_size}")


def rank_coordinates(rank: int, tp_size: int, cp_size: int) -> tuple[int, int, int]:
    """(tp_rank, cp_rank, dp_rank) of a global rank in the tp-cp-dp order."""
    return rank % tp_size, (rank // tp_size) % cp_size, rank // (tp_size * cp_size)


def group_ranks(world_size: int, tp_size: int, cp_size: int) -> dict[str, list[list[int]]]:
    """All rank lists of each kind of group; every process must create them in this same order."""
    check_layout(world_size, tp_size, cp_size)
    dp_size = world_size // (tp_size * cp_size)
    coords = [rank_coordinates(r, tp_size, cp_size) for r in range(world_size)]

    def groups_varying(axis: int) -> list[list[int]]:
        by_key: dict[tuple, list[int]] = {}
        for rank, c in enumerate(coords):
            key = tuple(v for i, v in enumerate(c) if i != axis)
            by_key.setdefault(key, []).append(rank)
        return list(by_key.values())

    model_parallel = [list(range(d * tp_size * cp_size, (d + 1) * tp_size * cp_size)) for d in range(dp_size)]
    return {"tp": groups_varying(0), "cp": groups_varying(1), "dp": groups_varying(2),
            "model_parallel": model_parallel}


def check_layout(world_size: int, tp_size: int, cp_size: int) -> None:
    for name, value in (("tp", tp_size), ("cp", cp_size)):
        if value < 1:
            raise ParallelConfigError(f"parallel.{name} must be >= 1, got {value}")
    if world_size % (tp_size * cp_size):
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by tp ({tp_size}) x cp ({cp_size}) = {tp_size * cp_size}")


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> tuple[int, int, int]:
    """Start torch.distributed from torchrun or Slurm variables; returns (rank, world_size, local_rank).

    Without either set, this is a single process and nothing is initialised. NCCL on CUDA, gloo
    otherwise; the CUDA device follows Slurm's GPU binding (`launch_env.cuda_ordinal`).
    """
    env = os.environ
    launch = launch_from_env(env)
    if launch is None:
        return 0, 1, 0
    export_launch(env, launch)   # a direct srun sets none of RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), launch.local_rank
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(cuda_ordinal(launch, torch.cuda.device_count(), node_gpu_count(env), env))
    dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size,
                            timeout=timedelta(minutes=timeout_minutes))
    return launch.rank, launch.world_size, launch.local_rank


def build_parallel_state(tp_size: int = 1, cp_size: int = 1, sequence_parallel: bool = False) -> ParallelState:
    """Create the tp, cp, dp and model-parallel groups of this process (collective over all ranks)."""
    if sequence_parallel and tp_size == 1:
        raise ParallelConfigError("parallel.sequence_parallel needs parallel.tp > 1 (got tp=1)")
    if not dist.is_initialized():
        if tp_size * cp_size != 1:
            raise ParallelConfigError(
                f"tp={tp_size} x cp={cp_size} needs {tp_size * cp_size} processes; launch with torchrun")
        return ParallelState()
    world, rank = dist.get_world_size(), dist.get_rank()
    tp_rank, cp_rank, dp_rank = rank_coordinates(rank, tp_size, cp_size)
    mine: dict[str, dist.ProcessGroup] = {}
    for kind, rank_lists in group_ranks(world, tp_size, cp_size).items():
        for ranks in rank_lists:
            group = dist.new_group(ranks)  # every rank creates every group, in the same order
            if rank in ranks:
                mine[kind] = group
    return ParallelState(tp_size=tp_size, cp_size=cp_size, dp_size=world // (tp_size * cp_size),
                         tp_rank=tp_rank, cp_rank=cp_rank, dp_rank=dp_rank,
                         tp_group=mine["tp"], cp_group=mine["cp"], dp_group=mine["dp"],
                         model_parallel_group=mine["model_parallel"], sequence_parallel=sequence_parallel)
