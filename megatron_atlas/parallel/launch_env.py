"""Who started this process, and which GPU it drives.

Two launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK; it also sets MASTER_ADDR/PORT) and a
direct `srun` with one task per GPU (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR
exported by the job script, launch/slurm.sbatch with LAUNCHER=srun). For the latter the variables
torch.distributed and DeepSpeed read are exported from Slurm's: RANK, WORLD_SIZE, LOCAL_RANK
(DeepSpeed asserts on it) and a job-derived MASTER_PORT.

The CUDA device is not simply the local rank: when Slurm binds GPUs to tasks (--gpus-per-task=1,
--gpu-bind) each task sees one GPU, which is its device 0. `cuda_ordinal` reasons from how many
GPUs the task sees (torch.cuda.device_count(), which follows CUDA_VISIBLE_DEVICES) against how many
the node has (SLURM_GPUS_ON_NODE, or the SLURM_STEP_GPUS / SLURM_JOB_GPUS lists).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional

DEFAULT_MASTER_PORT = 29500
_PORT_BASE, _PORT_SPAN = 10000, 50000


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: Optional[int]   # processes on this node, when the launcher says
    launcher: str                     # "torchrun" | "srun"


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
    return int(env[key]) if env.get(key, "").isdigit() else None


def launch_from_env(env: Mapping[str, str]) -> Optional[Launch]:
    """The launch this environment describes (None: a single process started by hand)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return Launch(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                      1 if world == 1 else _int(env, "LOCAL_WORLD_SIZE"), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        world = int(env["SLURM_NTASKS"])
        return Launch(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)),
                      1 if world == 1 else _int(env, "SLURM_NTASKS_PER_NODE"), "srun")
    return None


def slurm_master_port(env: Mapping[str, str]) -> int:
    """10000 + SLURM_JOB_ID % 50000 (29500 outside a job): jobs that share a node get different
    ports. launch/slurm.sbatch computes the same."""
    job = env.get("SLURM_JOB_ID", "")
    return _PORT_BASE + int(job) % _PORT_SPAN if job.isdigit() else DEFAULT_MASTER_PORT


def export_launch(env: MutableMapping[str, str], launch: Launch) -> None:
    """Fill in what torch.distributed and DeepSpeed read, without overriding what is set."""
    env.setdefault("RANK", str(launch.rank))
    env.setdefault("WORLD_SIZE", str(launch.world_size))
    env.setdefault("LOCAL_RANK", str(launch.local_rank))
    env.setdefault("MASTER_PORT", str(slurm_master_port(env)))


def node_gpu_count(env: Mapping[str, str]) -> Optional[int]:
    """GPUs Slurm allocated on this node (None outside Slurm or without GPUs requested)."""
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    for key in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(key):
            return len([g for g in env[key].split(",") if g.strip()])
    return None


def cuda_ordinal(launch: Launch, visible: int, gpus_on_node: Optional[int], env: Mapping[str, str]) -> int:
    """The CUDA device (among the `visible` ones) that this process drives.

    - one visible GPU, or one process on the node: device 0 (Slurm bound one GPU to the task);
    - the task sees every GPU of the node (or the node's count is unknown, as under torchrun
      outside Slurm): its local rank;
    - anything else (several GPUs per task, but not all) is ambiguous and refused."""
    local_rank = launch.local_rank
    where = (f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')}, "
             f"SLURM_GPUS_ON_NODE={env.get('SLURM_GPUS_ON_NODE', '<unset>')}")
    if visible < 1:
        raise RuntimeError(f"no CUDA device is visible to local rank {local_rank} ({where})")
    if visible == 1 or launch.local_world_size == 1:
        return 0
    if gpus_on_node is not None and visible < gpus_on_node:
        raise RuntimeError(f"local rank {local_rank} sees {visible} of the node's {gpus_on_node} GPUs ({where}): "
                           f"run one process per GPU with one GPU bound to each task (srun --gpus-per-task=1) "
                           f"or let every task see all of the node's GPUs")
    if local_rank >= visible:
        raise RuntimeError(f"local rank {local_rank} but only {visible} GPUs are visible ({where}); "
                           f"start at most {visible} processes per node")
    return local_rank
