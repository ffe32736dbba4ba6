"""Measures the peak memory of one CPU training step of a small model (for tests/test_cost.py).

    MALLOC_MMAP_THRESHOLD_=65536 python -m tests.memory_peak PRESET CHECKPOINTING SEQ_LEN [OVERRIDE ...]

Prints JSON: the resident-set peak of the second step above the resident set just before it (the
weights and AdamW moments are live then, the gradients are not), sampled every 0.3 ms, next to the
estimate of `megatron_atlas.train.cost` for the same step (fp32, micro-batch 1). The small mmap
threshold makes glibc return every large block at free, so the resident set follows the tensors.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time

import torch

from megatron_atlas.configs import compose, to_model_config
from megatron_atlas.model import build_model
from megatron_atlas.train.cost import estimate_training_memory
from megatron_atlas.train.loss import loss_sum
from megatron_atlas.train.recompute import checkpoint_blocks

SIZE = ["model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.vocab_size=2048", "model.memory.chunk=64"]


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(preset: str, checkpointing: bool, seq_len: int, overrides=()) -> dict:
    cfg = to_model_config(compose(preset, "tiny", "tiny", SIZE + list(overrides)))
    torch.manual_seed(0)
    model = build_model(cfg)
    if checkpointing:
        checkpoint_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len + 1))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_sum(model(ids[:, :-1]), ids[:, 1:]).backward()
        optimizer.step()

    step()                                   # the AdamW moments exist from here on
    optimizer.zero_grad(set_to_none=True)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _resident()
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _resident())
            time.sleep(0.0003)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    done.set()
    sampler.join()
    estimate = estimate_training_memory(model.cfg, seq_len, checkpointing=checkpointing, bf16=False,
                                        parameters=model.num_parameters())
    return {"measured": peak[0] - base, "estimated": estimate.total - estimate.weights_and_optimizer}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4:])))
