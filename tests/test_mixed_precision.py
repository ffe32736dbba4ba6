"""bf16 mixed precision: the memory operator keeps its own precision under the caller's autocast,
and every preset trains in bf16 (CPU autocast follows CUDA autocast's rules for these ops)."""
from __future__ import annotations

import pytest
import torch

from kernels.memory import Gates, MemoryConfig, memory_forward
from megatron_atlas.configs import compose, to_model_config, to_train_config
from megatron_atlas.train.loop import train

from .memory_cases import leaves, make_inputs, relative_error

PRESETS = ["transformer", "titans", "omeganet", "dla", "atlas", "atlas_pp", "atlas_mag", "atlas_mal"]
OPERATOR_CASES = [("mlp", "gd", 1, 1), ("linear", "gd", 3, 2), ("mlp", "gd", 2, 2),
                  ("gated_mlp", "gd", 2, 1), ("mlp", "muon", 2, 2)]


def _run(cfg, inputs, impl, autocast: bool):
    q, k, v, gates, params = inputs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, state = memory_forward(q, k, v, gates, params, cfg, impl=impl)
        loss = y.float().square().sum() + sum(w.square().sum() for w in state.weights.values())
    loss.backward()   # outside, as torch.autocast's documentation asks
    return y, [t.grad.clone() for t in leaves_of(inputs)]


def leaves_of(inputs):
    q, k, v, gates, params = inputs
    return [q, k, v, *[g for g in gates if g is not None], *params.values()]


def _inputs(cfg, dtype=torch.float32):
    q, k, v, gates, params = make_inputs(cfg, batch=2, length=40, heads=2, dtype=dtype)
    leaves(q, k, v, gates, params)
    return q, k, v, gates, params


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("kind,rule,window,degree", OPERATOR_CASES)
def test_operator_under_autocast_computes_in_fp32(impl, kind, rule, window, degree):
    cfg = MemoryConfig(kind=kind, rule=rule, window=window, degree=degree, chunk=16)
    plain_y, plain_grads = _run(cfg, _inputs(cfg), impl, autocast=False)
    # fp32 inputs under autocast: autocast is off inside, so nothing is rounded to bf16
    auto_y, auto_grads = _run(cfg, _inputs(cfg), impl, autocast=True)
    assert auto_y.dtype == torch.float32
    torch.testing.assert_close(auto_y, plain_y, rtol=1e-6, atol=1e-6)
    for got, expected in zip(auto_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,rule,window,degree", OPERATOR_CASES)
def test_operator_with_bf16_inputs_matches_fp32_to_bf16_tolerance(kind, rule, window, degree):
    cfg = MemoryConfig(kind=kind, rule=rule, window=window, degree=degree, chunk=16)
    exact = _inputs(cfg, torch.float64)
    y64, _ = _run(cfg, exact, "chunked", autocast=False)
    q, k, v, gates, params = _inputs(cfg, torch.float64)
    low = (q.detach().bfloat16(), k.detach().bfloat16(), v.detach().bfloat16(),
           Gates(*(None if g is None else g.detach().float() for g in gates)),
           {n: p.detach().float() for n, p in params.items()})
    leaves(*low)
    y16, grads = _run(cfg, low, "chunked", autocast=True)
    assert y16.dtype == torch.bfloat16 and all(torch.isfinite(g).all() for g in grads)
    assert relative_error(y16.double(), y64.detach()) < 3e-2


@pytest.mark.parametrize("kind,rule", [("mlp", "gd"), ("gated_mlp", "muon")])
def test_backward_called_inside_autocast_still_runs_the_operator_in_fp32(kind, rule):
    # torch.autocast advises against it, but users do it; the operator's own autograd Functions
    # must not mix dtypes in their in-place state updates when it happens
    cfg = MemoryConfig(kind=kind, rule=rule, window=2, chunk=16)
    q, k, v, gates, params = _inputs(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = memory_forward(q, k, v, gates, params, cfg, impl="chunked")
        y.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.dtype == torch.float32 for t in (q, k, v))


def _losses(preset: str, precision: str, out_dir) -> list[float]:
    cfg = compose(preset, "tiny", "tiny", ["train.steps=4", "train.micro_batch_size=2", "train.seq_len=64",
                                           "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0",
                                           f"train.precision={precision}", "train.data.eval_batches=1",
                                           f"train.out_dir={out_dir / precision}", "train.tensorboard=false"])
    summary = train(to_model_config(cfg), to_train_config(cfg), log=lambda line: None)
    return summary["losses"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_in_bf16_close_to_fp32(preset, tmp_path):
    fp32, bf16 = _losses(preset, "fp32", tmp_path), _losses(preset, "bf16", tmp_path)
    assert len(bf16) == len(fp32) == 4 and all(loss == loss for loss in bf16)
    for a, b in zip(bf16, fp32):
        assert abs(a - b) <= 0.03 * b, (preset, bf16, fp32)
