"""The cost table (tools/cost.py): its FLOPs are the counter's, its memory estimate (a meta-device
simulation) is within 25% of a measured CPU training step, and it says what a GPU would run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_atlas.configs import compose, to_model_config
from megatron_atlas.model.lm import resolve_ffn_hidden
from megatron_atlas.train.flops import training_flops_per_token
from tools.cost import cost_row

ROOT = Path(__file__).resolve().parent.parent


def test_cost_row_flops_are_the_counters_and_the_ratio_is_to_transformer():
    base = training_flops_per_token(resolve_ffn_hidden(to_model_config(compose("transformer", "tiny"))), 256)
    row = cost_row("atlas", "tiny", 256, (), base)
    counted = training_flops_per_token(resolve_ffn_hidden(to_model_config(compose("atlas", "tiny"))), 256)
    assert row.flops_per_token == counted and row.ratio_to_transformer == pytest.approx(counted / base)
    assert 0 < row.memory_gb_checkpointed < row.memory_gb_plain
    assert row.gpu_impl == "chunked" and "muon_block" in row.gpu_reason


@pytest.mark.parametrize("preset,checkpointing,overrides", [
    ("titans", False, ()), ("titans", True, ()), ("transformer", False, ()),
    ("atlas", True, ("model.memory.ns_block=256",)), ("omeganet", False, ())])
def test_memory_estimate_is_within_25_percent_of_a_measured_step(preset, checkpointing, overrides):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-m", "tests.memory_peak", preset, str(int(checkpointing)), "1024",
                          *overrides], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["measured"] > 50 * 2 ** 20, result        # activations dominate: the check means something
    assert 0.75 <= result["estimated"] / result["measured"] <= 1.25, result


def test_memory_budget_check_names_the_estimate_and_the_keys_that_lower_it():
    from megatron_atlas.train.cost import MemoryBudgetError, check_memory_budget, estimates
    cfg = resolve_ffn_hidden(to_model_config(compose("titans", "tiny")))
    plain, checkpointed = estimates(cfg, 4096)[False], estimates(cfg, 4096)[True]
    needed = check_memory_budget(plain, 0)           # 0: no budget, only the figure
    assert needed > check_memory_budget(checkpointed, 0) > 0
    with pytest.raises(MemoryBudgetError, match=r"needs about [\d.]+ GiB per GPU .*parallel.activation_checkpointing=true"):
        check_memory_budget(plain, needed / 2)
    assert check_memory_budget(plain, needed * 1.01) == needed
    # ZeRO-3 over 4 ranks shards weights, moments and gradients; TP=2 halves what is left
    assert check_memory_budget(plain, 0, dp=4, zero_stage=3) < needed
    assert check_memory_budget(plain, 0, tp=2) == pytest.approx(needed / 2, rel=1e-6)
