"""Launchers: torchrun_single.sh and torchrun_multi.sh train the tiny preset end to end with 2 CPU
processes; slurm.sbatch passes `bash -n` and, under a fake Slurm allocation (fake `scontrol` and
`srun` on PATH), runs one srun over all nodes with torchrun and a c10d rendezvous on the first node."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

from tests.test_deepspeed_zero import TIMEOUT, _free_port

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
RUN = ["--model", "atlas", "--size", "tiny", "--train", "tiny", "train.steps=2", "train.seq_len=32",
       "train.log_every=1", "train.eval_every=0", "train.data.eval_batches=1", "train.tensorboard=false",
       "train.data.mqar.num_kv_pairs=2"]


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def _check_run(done: subprocess.CompletedProcess, out: Path) -> None:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "dp=0/2" in done.stdout                       # two data-parallel ranks
    assert done.stdout.count("step 2/2 | loss") == 1     # rank 0 logs, rank 1 does not
    assert len(_losses(out)) == 2 and (out / "checkpoints" / "latest").read_text() == "step-00000002"


def test_torchrun_single_trains_tiny_on_two_processes(tmp_path):
    port = _free_port()
    cmd = [str(LAUNCH / "torchrun_single.sh"), "--nproc", "2", *RUN, "parallel=zero1", f"train.out_dir={tmp_path}"]
    # --standalone picks its own port; TORCHRUN shows the hook that wraps the torchrun command
    done = subprocess.run(cmd, env=_env(TORCHRUN=f"torchrun --master_port {port}"), capture_output=True,
                          text=True, timeout=TIMEOUT)
    _check_run(done, tmp_path)


def test_torchrun_multi_one_node_of_two_processes(tmp_path):
    env = _env(NNODES="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cmd = [str(LAUNCH / "torchrun_multi.sh"), "--nproc", "2", *RUN, f"train.out_dir={tmp_path}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    _check_run(done, tmp_path)


def test_torchrun_multi_refuses_a_bad_node_rank():
    env = _env(NNODES="2", NODE_RANK="2", MASTER_ADDR="n0")
    done = subprocess.run([str(LAUNCH / "torchrun_multi.sh"), "--dry-run", *RUN], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "NODE_RANK=2 must be in [0, NNODES=2)" in done.stderr


FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || exit 1
[[ "$3" == "gpu-[07-09]" ]] || { echo "unexpected nodelist $3" >&2; exit 1; }
printf 'gpu-07\\ngpu-08\\ngpu-09\\n'
"""
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$SRUN_ARGS"
"""


def _slurm_env(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-[07-09]", SLURM_NNODES="3",
                SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(REPO),
                SRUN_ARGS=str(tmp_path / "srun_args"))


def test_slurm_script_parses_and_derives_the_rendezvous(tmp_path):
    script = LAUNCH / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    env = _slurm_env(tmp_path)
    args = ["--model", "atlas_mag", "--size", "1.3B", "parallel=tp2_zero2", "train.lr=7e-4"]
    expected = ["--nodes", "3", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                "torchrun", "--nnodes", "3", "--nproc_per_node", "4", "--rdzv_id", "4242",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu-07:29500",
                "-m", "megatron_atlas.train", "model=atlas_mag", "size=1.3B", "parallel=tp2_zero2", "train.lr=7e-4"]

    dry = subprocess.run(["bash", str(script), "--dry-run", *args], env=env, capture_output=True, text=True,
                         timeout=30)
    assert dry.returncode == 0, dry.stderr
    assert shlex.split(dry.stdout) == ["srun", *expected]
    assert not (tmp_path / "srun_args").exists()         # a dry run starts nothing

    real = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=30)
    assert real.returncode == 0, real.stderr
    assert (tmp_path / "srun_args").read_text().splitlines() == expected
    assert "3 nodes x 4 processes, rendezvous gpu-07:29500" in real.stderr


def test_slurm_script_outside_an_allocation_says_so(tmp_path):
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "--model", "atlas", "--size", "tiny"], env=env,
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.returncode != 0 and "not inside a Slurm allocation" in done.stderr
