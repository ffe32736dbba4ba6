"""A non-finite step is skipped as a whole: the decision is taken once per optimizer step for all
parameter groups and ranks, never per group.

- GuardedAdamW alone, called as DeepSpeed's ZeRO-1/2/3 call it (once per group, `param_groups`
  narrowed to that group): a nan gradient in the second group only leaves both groups unchanged
  (checking per call, as before, stepped the first group).
- DeepSpeed ZeRO-0/1/2/3, 2 gloo processes: a nan gradient in one no-decay parameter on rank 1 only
  changes no parameter, and the step reports skipped on both ranks; the steps before and after
  change the weights. (DeepSpeed 0.19 also refuses an fp32 step with a non-finite norm itself;
  the guard does not rely on it.)
- The step's host reads, ZeRO-0 and 2: exactly one (the skip decision) for 1 or 4 micro-batches
  and 1 or 3 layers.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_atlas.train.guarded import GuardedAdamW
from tests.test_deepspeed_zero import REPO, TIMEOUT, _free_port


def _per_group_steps(optimizer: GuardedAdamW) -> None:
    """What DeepSpeed's ZeRO optimizers do: one step() per group, param_groups narrowed to it."""
    groups = optimizer.param_groups
    for group in groups:
        optimizer.param_groups = [group]
        optimizer.step()
    optimizer.param_groups = groups


def _two_groups(bad: bool):
    a, b = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(4))
    optimizer = GuardedAdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    a.grad, b.grad = torch.full((3, 2), 0.5), torch.full((4,), float("nan") if bad else 0.5)
    norm = torch.linalg.vector_norm(torch.cat([a.grad.flatten(), b.grad]))   # what DeepSpeed computed
    optimizer.arm(lambda: norm, loss=torch.tensor(2.0))
    return optimizer, a, b


def test_one_non_finite_group_skips_every_group():
    optimizer, a, b = _two_groups(bad=True)
    _per_group_steps(optimizer)
    assert optimizer.skipped and torch.equal(a, torch.ones(3, 2)) and torch.equal(b.detach(), torch.ones(4))
    optimizer, a, b = _two_groups(bad=False)
    _per_group_steps(optimizer)
    assert not optimizer.skipped and not torch.equal(a, torch.ones(3, 2)) and not torch.equal(b, torch.ones(4))


def test_a_non_finite_loss_skips_and_an_unarmed_step_is_refused():
    optimizer, a, _ = _two_groups(bad=False)
    optimizer.arm(lambda: torch.tensor(1.0), loss=torch.tensor(float("inf")))
    _per_group_steps(optimizer)
    assert optimizer.skipped and torch.equal(a, torch.ones(3, 2))
    fresh = GuardedAdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(RuntimeError, match="before arm"):
        fresh.step()


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ds_step")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(REPO / "tests" / "deepspeed_step_worker.py"), str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2 * TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("stage", ["0", "1", "2", "3"])
def test_zero_stage_skips_a_step_non_finite_in_one_group_on_one_rank(worker, stage):
    for rank in worker:
        steps = rank["guard"][stage]
        assert steps["0"]["changed"] and not steps["0"]["skipped"]
        assert not steps["1"]["changed"] and steps["1"]["skipped"]          # no parameter moved, counted
        assert not math.isfinite(steps["1"]["grad_norm"])
        assert steps["2"]["changed"] and not steps["2"]["skipped"]


@pytest.mark.parametrize("stage", ["0", "2"])
def test_a_deepspeed_step_reads_the_host_once(worker, stage):
    for rank in worker:
        for case, reads in rank["host_reads"][stage].items():
            assert sum(reads.values()) == 1, (case, reads)
            assert all(k.startswith("megatron_atlas/train/guarded.py") for k in reads), (case, reads)
