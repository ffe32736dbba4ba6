"""Launch variables: a direct srun gets RANK/WORLD_SIZE/LOCAL_RANK and a job-derived MASTER_PORT
from Slurm's, and the CUDA device follows what the task sees (a Slurm GPU binding makes the
task's one GPU its device 0, not its local rank)."""
from __future__ import annotations

import argparse

import pytest
import torch

from megatron_atlas.parallel.launch_env import (Launch, cuda_ordinal, export_launch, launch_from_env,
                                                node_gpu_count, slurm_master_port)
from megatron_atlas.train.deepspeed_engine import deepspeed_args

SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_JOB_ID": "123456", "MASTER_ADDR": "node7"}


def test_a_direct_srun_exports_what_torch_and_deepspeed_read():
    env = dict(SRUN)
    launch = launch_from_env(env)
    assert launch == Launch(rank=5, world_size=8, local_rank=1, local_world_size=4, launcher="srun")
    export_launch(env, launch)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_PORT"] == str(10000 + 123456 % 50000) == "33456"
    mine = {**SRUN, "MASTER_PORT": "4000"}
    export_launch(mine, launch)
    assert mine["MASTER_PORT"] == "4000"   # an explicit port wins
    assert slurm_master_port({}) == 29500


def test_torchrun_wins_and_no_launcher_is_a_single_process():
    env = {**SRUN, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}
    assert launch_from_env(env) == Launch(2, 4, 2, 4, "torchrun")   # torchrun under srun: its own ranks
    assert launch_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) is None   # no MASTER_ADDR: no job script
    assert launch_from_env({}) is None


def test_the_node_gpu_count_comes_from_slurm():
    assert node_gpu_count({"SLURM_GPUS_ON_NODE": "8"}) == 8
    assert node_gpu_count({"SLURM_STEP_GPUS": "0,1,2,3"}) == 4
    assert node_gpu_count({"SLURM_JOB_GPUS": "4,5"}) == 2
    assert node_gpu_count({}) is None


def _launch(local_rank: int, local_world=4) -> Launch:
    return Launch(local_rank, 8, local_rank, local_world, "srun")


def test_cuda_ordinal_follows_the_binding():
    # every task sees the node's 4 GPUs (no binding; torchrun): its local rank
    assert cuda_ordinal(_launch(3), visible=4, gpus_on_node=4, env={}) == 3
    assert cuda_ordinal(_launch(3), visible=4, gpus_on_node=None, env={}) == 3
    # --gpus-per-task=1: local rank 3 sees one GPU, its device 0
    assert cuda_ordinal(_launch(3), visible=1, gpus_on_node=4, env={}) == 0
    # one process on the node sees two of its GPUs: the first
    assert cuda_ordinal(_launch(0, local_world=1), visible=2, gpus_on_node=8, env={}) == 0
    bound = {"CUDA_VISIBLE_DEVICES": "2,3", "SLURM_GPUS_ON_NODE": "8"}
    with pytest.raises(RuntimeError, match=r"sees 2 of the node's 8 GPUs \(CUDA_VISIBLE_DEVICES=2,3"):
        cuda_ordinal(_launch(1), visible=2, gpus_on_node=8, env=bound)
    with pytest.raises(RuntimeError, match="local rank 5 but only 4 GPUs are visible"):
        cuda_ordinal(_launch(5, local_world=8), visible=4, gpus_on_node=None, env={})
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        cuda_ordinal(_launch(0), visible=0, gpus_on_node=4, env={})


def test_deepspeed_is_told_the_chosen_device():
    # DeepSpeed would otherwise put the engine on cuda:LOCAL_RANK, absent under a GPU binding
    assert deepspeed_args(torch.device("cuda", 0)) == argparse.Namespace(device_rank=0)
    assert deepspeed_args(torch.device("cpu")) is None
