"""DeepSpeed data parallelism on CPU (gloo, 2 processes under torchrun):

- DP=2 with ZeRO-1, -2 and -3 (and ZeRO-0, plain DeepSpeed DP: slow) gives the losses of one process holding the global batch for several
  steps, to 1e-5 in fp32 (measured: ~5e-7), and consolidating each run's checkpoint gives the
  one-process weights (to 1e-5);
- a ZeRO-2 run stopped and resumed with `resume=auto` continues exactly (optimizer state included);
- the stopped run, consolidated, resumes on one process (another DP size): the data continue and
  the next loss equals the uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_atlas.configs import compose, to_model_config, to_parallel_config, to_train_config
from megatron_atlas.train.checkpoint import find_latest, is_deepspeed_checkpoint, load_checkpoint
from megatron_atlas.train.loop import train

REPO = Path(__file__).resolve().parent.parent
RUN = ["model=titans", "size=tiny", "train=tiny", "train.steps=4", "train.log_every=1", "train.eval_every=0",
       "train.seq_len=64", "train.data.eval_batches=1", "train.tensorboard=false", "train.warmup_steps=2"]
TOL = 1e-5
TIMEOUT = 240   # seconds per torchrun; the first DeepSpeed run on a machine also builds its CPU comm op


def torchrun(nproc: int, args: list[str], module: str = "megatron_atlas.train", timeout: int = TIMEOUT) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), "-m", module, *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def native(out_dir: Path, *overrides: str) -> dict:
    cfg = compose("titans", "tiny", "tiny", [a for a in RUN[3:]] + [f"train.out_dir={out_dir}", *overrides])
    return train(to_model_config(cfg), to_train_config(cfg), log=lambda line: None,
                 parallel_cfg=to_parallel_config(cfg))


def consolidate(src: Path, out: Path) -> dict:
    subprocess.run([sys.executable, str(REPO / "tools" / "checkpoint_tool.py"), "consolidate", str(src), str(out)],
                   check=True, capture_output=True, timeout=120)
    return load_checkpoint(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, global batch 4."""
    out = tmp_path_factory.mktemp("native")
    native(out, "train.micro_batch_size=4")
    return out


@pytest.fixture(scope="module")
def dp2_runs(tmp_path_factory):
    """stage -> out_dir of a 2-process run with 2 samples per rank (made once per module)."""
    made: dict[int, Path] = {}

    def run(stage: int) -> Path:
        if stage not in made:
            out = tmp_path_factory.mktemp(f"zero{stage}")
            torchrun(2, RUN + [f"parallel=zero{stage}", "train.micro_batch_size=2", f"train.out_dir={out}"])
            made[stage] = out
        return made[stage]
    return run


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), 1, 2, 3])
def test_dp2_zero_stage_matches_one_process_with_the_global_batch(stage, reference, dp2_runs, tmp_path):
    run = dp2_runs(stage)
    expected, got = train_losses(reference), train_losses(run)
    assert got.keys() == expected.keys() == {1, 2, 3, 4}
    assert all(abs(got[s] - expected[s]) < TOL for s in expected), (got, expected)
    assert len(set(got.values())) == 4   # the steps really differ: the comparison has teeth

    saved = find_latest(run)
    assert is_deepspeed_checkpoint(saved)
    full = consolidate(saved, tmp_path / "consolidated")["model"]
    want = load_checkpoint(find_latest(reference))["model"]
    assert full.keys() == want.keys()
    assert all((full[k] - want[k]).abs().max() < TOL for k in want)


def test_zero2_resume_same_layout_and_on_one_process(reference, dp2_runs, tmp_path):
    straight, split = dp2_runs(2), tmp_path / "split"
    args = RUN + ["parallel=zero2", "train.micro_batch_size=2"]
    torchrun(2, args + [f"train.out_dir={split}", "train.exit_at_step=2"])
    torchrun(2, args + [f"train.out_dir={split}", "train.resume=auto"])
    a, b = train_losses(straight), train_losses(split)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)   # optimizer state went through the checkpoint

    # the step-2 DeepSpeed checkpoint (2 ranks x 2 samples), consolidated, resumed by one process x 4
    step2 = split / "checkpoints" / "step-00000002"
    state = consolidate(step2, tmp_path / "step2-full")
    assert state["step"] == 2 and state["loader"]["consumed"] == 2 * 4
    one = native(tmp_path / "one", "train.micro_batch_size=4", f"train.resume={tmp_path / 'step2-full'}")
    assert abs(one["losses"][0] - train_losses(reference)[3]) < TOL


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_to_fp32_in_the_checkpoint_works_as_deepspeed_documents_it(stage, reference, dp2_runs, tmp_path):
    """`python zero_to_fp32.py . out/` run inside the step folder (DeepSpeed's documented call; its own
    copy needs a `latest` file and a global_stepN tag), with --safe_serialization, -t and a shard
    size: every form gives the one-process weights."""
    import torch
    from safetensors.torch import load_file

    step = find_latest(dp2_runs(stage))
    assert (step / "zero_to_fp32.py").is_file() and not (step / "zero_to_torch.py").exists()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    calls = {"bin": [".", str(tmp_path / "bin")],
             "safe": [str(step), str(tmp_path / "safe"), "--safe_serialization", "-t", "deepspeed"],
             "sharded": [".", str(tmp_path / "sharded"), "--max_shard_size", "20KB"]}
    for args in calls.values():
        done = subprocess.run([sys.executable, "zero_to_fp32.py", *args], cwd=step, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
    want = load_checkpoint(find_latest(reference))["model"]
    index = json.loads((tmp_path / "sharded" / "pytorch_model.bin.index.json").read_text())
    sharded = {}
    for name in sorted(set(index["weight_map"].values())):
        sharded.update(torch.load(tmp_path / "sharded" / name, weights_only=True))
    assert len(set(index["weight_map"].values())) > 1
    for got in (torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True),
                load_file(str(tmp_path / "safe" / "model.safetensors")), sharded):
        assert got.keys() == want.keys()
        assert all((got[k] - want[k]).abs().max() < TOL for k in want)
    wrong = subprocess.run([sys.executable, "zero_to_fp32.py", ".", str(tmp_path / "x"), "-t", "global_step4"],
                           cwd=step, env=env, capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "-t global_step4" in wrong.stderr
