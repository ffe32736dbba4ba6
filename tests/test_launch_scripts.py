"""Launchers: torchrun_single.sh and torchrun_multi.sh train the tiny preset end to end with 2 CPU
processes; slurm.sbatch passes `bash -n` and, under a fake Slurm allocation (fake `scontrol` and
`srun` on PATH), runs one srun over all nodes with torchrun and a c10d rendezvous on the first node
(port and CPUs derived from the job), or with LAUNCHER=srun one task per process that trains with
no torchrun (a fake srun starting 2 local tasks the way Slurm does); the GPU count follows
CUDA_VISIBLE_DEVICES and ignores MIG lines (fake `nvidia-smi`)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
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
                SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="64", SLURM_SUBMIT_DIR=str(REPO),
                SRUN_ARGS=str(tmp_path / "srun_args"))


def test_slurm_script_parses_and_derives_the_rendezvous(tmp_path):
    script = LAUNCH / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    env = _slurm_env(tmp_path)
    args = ["--model", "atlas_mag", "--size", "1.3B", "parallel=tp2_zero2", "train.lr=7e-4"]
    # the port is 10000 + job id % 50000; the job's 64 CPUs go to the node's torchrun task
    expected = ["--nodes", "3", "--ntasks-per-node", "1", "--cpus-per-task", "64", "--kill-on-bad-exit=1",
                "torchrun", "--nnodes", "3", "--nproc_per_node", "4", "--rdzv_id", "4242",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu-07:14242",
                "-m", "megatron_atlas.train", "model=atlas_mag", "size=1.3B", "parallel=tp2_zero2", "train.lr=7e-4"]

    dry = subprocess.run(["bash", str(script), "--dry-run", *args], env=env, capture_output=True, text=True,
                         timeout=30)
    assert dry.returncode == 0, dry.stderr
    assert shlex.split(dry.stdout) == ["srun", *expected]
    assert not (tmp_path / "srun_args").exists()         # a dry run starts nothing

    real = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=30)
    assert real.returncode == 0, real.stderr
    assert (tmp_path / "srun_args").read_text().splitlines() == expected
    assert "3 nodes x 4 processes (torchrun), rendezvous gpu-07:14242" in real.stderr

    direct = subprocess.run(["bash", str(script), "--dry-run", *args], env={**env, "LAUNCHER": "srun", "MASTER_PORT": "23456"},
                            capture_output=True, text=True, timeout=30)
    assert direct.returncode == 0, direct.stderr
    # one task per GPU, the node's 64 CPUs shared among its 4 processes, python without torchrun
    assert shlex.split(direct.stdout) == ["srun", "--nodes", "3", "--ntasks-per-node", "4", "--cpus-per-task", "16",
                                          "--kill-on-bad-exit=1", "python", *expected[-6:]]
    assert "rendezvous gpu-07:23456" in direct.stderr   # MASTER_PORT still overrides


def test_slurm_script_outside_an_allocation_says_so(tmp_path):
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "--model", "atlas", "--size", "tiny"], env=env,
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.returncode != 0 and "not inside a Slurm allocation" in done.stderr


FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
[[ "$1" == "-L" ]] || exit 1
printf 'GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-aaaa)\\n'
printf '  MIG 3g.40gb     Device  0: (UUID: MIG-1111)\\n  MIG 3g.40gb     Device  1: (UUID: MIG-2222)\\n'
printf 'GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-bbbb)\\nGPU 2: NVIDIA A100-SXM4-80GB (UUID: GPU-cccc)\\n'
"""


def _fake_bin(tmp_path: Path, **scripts: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_gpu_count_follows_cuda_visible_devices_and_ignores_mig_lines(tmp_path):
    path = _fake_bin(tmp_path, **{"nvidia-smi": FAKE_NVIDIA_SMI})
    probe = f"source {LAUNCH / 'common.sh'}; echo $(default_nproc) ${{DS_ACCELERATOR:-gpu}}; cpu_environment; " \
            f"echo ${{DS_ACCELERATOR:-gpu}}"
    cases = {None: "3 gpu gpu", "0,1": "2 gpu gpu", "2": "1 gpu gpu", "GPU-aaaa,GPU-cccc": "2 gpu gpu",
             "0,-1,2": "1 gpu gpu", "0,1,2,3,4,5": "3 gpu gpu", "": "1 gpu cpu", "-1": "1 gpu cpu"}
    for visible, expected in cases.items():
        env = {k: v for k, v in _env(PATH=path).items() if k not in ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR")}
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        done = subprocess.run(["bash", "-c", probe], env=env, capture_output=True, text=True, timeout=30)
        assert done.stdout.split() == expected.split(), (visible, done.stdout, done.stderr)
    dry = subprocess.run([str(LAUNCH / "torchrun_single.sh"), "--dry-run", *RUN], capture_output=True, text=True,
                         env={**_env(PATH=path), "CUDA_VISIBLE_DEVICES": "0,1"}, timeout=30)
    assert "--nproc_per_node 2" in dry.stdout, dry.stdout + dry.stderr


FAKE_LOCAL_SRUN = """#!/usr/bin/env bash
# one Slurm step on this machine: --ntasks-per-node tasks of the command, each with the variables
# Slurm sets for a task (and none of torchrun's)
tasks=1
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in
    --ntasks-per-node) tasks=$2; shift 2 ;;
    --nodes|--cpus-per-task) shift 2 ;;
    *) shift ;;
  esac
done
pids=()
for ((i = 0; i < tasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_NTASKS=$tasks SLURM_NTASKS_PER_NODE=$tasks \\
    "$@" > "$SRUN_LOG.$i" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
cat "$SRUN_LOG".*
exit $status
"""


def test_slurm_direct_srun_trains_without_torchrun(tmp_path):
    path = _fake_bin(tmp_path, scontrol="#!/usr/bin/env bash\necho 127.0.0.1\n", srun=FAKE_LOCAL_SRUN)
    env = {k: v for k, v in _env().items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env.update(PATH=path, SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", SLURM_JOB_ID="77", SLURM_SUBMIT_DIR=str(REPO),
               LAUNCHER="srun", GPUS_PER_NODE="2", MASTER_PORT=str(_free_port()), PYTHON=sys.executable,
               SRUN_LOG=str(tmp_path / "task"))
    done = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *RUN, "parallel=zero1", f"train.out_dir={tmp_path / 'out'}"],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    _check_run(done, tmp_path / "out")   # DeepSpeed found LOCAL_RANK, the two tasks met as DP ranks
