"""An optimizer step that leaves NaN in the weights or the optimizer state is undone (or stops the
run), and `bad_state_entries` names what is non-finite."""
from __future__ import annotations

import pytest
import torch

from megatron_atlas.errors import NonFiniteState
from megatron_atlas.train.finite import UpdateGuard, all_finite, bad_state_entries


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _step(model, optimizer, guard: UpdateGuard) -> bool:
    optimizer.zero_grad()
    model(torch.randn(3, 4)).square().sum().backward()
    guard.snapshot()
    optimizer.step()
    return guard.check()


def _copy(model, optimizer) -> tuple[dict, dict]:
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}
    return weights, state


def test_a_finite_step_passes_and_changes_the_weights():
    model, opt = _model_and_optimizer()
    guard = UpdateGuard(model.parameters(), opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert _step(model, opt, guard)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_step_from_a_poisoned_second_moment_is_undone_exactly():
    """What a checkpoint with flipped bytes did: a negative exp_avg_sq, so sqrt() writes NaN."""
    model, opt = _model_and_optimizer()
    guard = UpdateGuard(model.parameters(), opt)
    assert _step(model, opt, guard)
    first = next(iter(model.parameters()))
    opt.state[first]["exp_avg_sq"][0, 0] = -1.0
    weights, state = _copy(model, opt)
    assert not _step(model, opt, guard)   # undone
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for p, s in opt.state.items():
        for key, value in s.items():
            saved = state[id(p)][key]
            assert torch.equal(value, saved) if torch.is_tensor(value) else value == saved
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_first_step_undone_leaves_no_optimizer_state():
    model, opt = _model_and_optimizer()
    guard = UpdateGuard(model.parameters(), opt)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    guard.snapshot()
    opt.step()
    assert not guard.check()
    assert len(opt.state) == 0


def test_without_undo_a_bad_step_raises():
    model, opt = _model_and_optimizer()
    guard = UpdateGuard(model.parameters(), opt, undo=False)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    guard.snapshot()
    opt.step()
    with pytest.raises(NonFiniteState, match="stopping before any checkpoint"):
        guard.check()


def test_all_finite_and_bad_state_entries():
    assert all_finite([torch.ones(3), torch.zeros(2, 2)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("-inf")])])
    state = {"model": {"a": torch.ones(2), "b": torch.tensor([float("nan")])},
             "optimizer": {"state": {0: {"exp_avg": torch.tensor([-1.0]), "exp_avg_sq": torch.tensor([-1.0])}}},
             "rng": torch.zeros(4, dtype=torch.uint8)}
    assert bad_state_entries(state) == ["model.b (NaN/inf)", "optimizer.state.0.exp_avg_sq (negative values)"]
