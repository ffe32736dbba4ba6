"""Sweep planning (megatron_atlas/sweep/{spec,grid}.py): the size rule, FLOPs on budget, bad inputs."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from megatron_atlas.configs import compose, to_model_config, to_train_config
from megatron_atlas.model import resolve_ffn_hidden
from megatron_atlas.model.config import ConfigError
from megatron_atlas.sweep.grid import plan_runs, read_plan, shape_for_depth, write_plan
from megatron_atlas.sweep.spec import SweepSpec, load_spec
from megatron_atlas.train.flops import training_flops_per_token

SEQ = ["train.seq_len=32", "train.micro_batch_size=2"]


def _spec(**kw) -> SweepSpec:
    base = dict(presets=["transformer"], size="tiny", train="tiny", budgets=[2e8, 6e8], depths=[1, 2],
                aspect_ratio=16, head_dim=16, min_steps=3, overrides=list(SEQ))
    return SweepSpec(**{**base, **kw}).validate()


def test_size_rule_fixes_aspect_ratio_and_head_width():
    assert shape_for_depth(3, 32, 16) == (s := shape_for_depth(3, 32, 16)) and (s.d_model, s.n_heads) == (96, 6)
    assert shape_for_depth(1, 8, 16).d_model == 16           # at least one head
    assert shape_for_depth(2, 40, 16).d_model == 80          # 2*40 = 80 = 5 heads of 16
    with pytest.raises(ConfigError, match="n_layers=0"):
        shape_for_depth(0, 32, 16)


def test_planned_runs_spend_their_budget_with_the_per_architecture_flop_count(tmp_path):
    spec = _spec(presets=["transformer", "titans"])
    runs = plan_runs(spec, log=lambda _: None)
    assert len(runs) == 2 * 2 * 2
    for run in runs:
        cfg = compose(run.preset, run.size, run.train, run.overrides)
        model_cfg, train_cfg = to_model_config(cfg), to_train_config(cfg)
        assert (model_cfg.n_layers, model_cfg.d_model) == (run.n_layers, 16 * run.n_layers)
        fpt = training_flops_per_token(resolve_ffn_hidden(model_cfg), train_cfg.seq_len)
        assert run.flops_per_token == fpt and fpt > 6 * run.params_non_embedding   # not 6N: attention, memory
        assert train_cfg.steps == run.steps and run.tokens == run.steps * train_cfg.tokens_per_step
        assert abs(run.steps * train_cfg.tokens_per_step * fpt / run.budget - 1) <= spec.flops_tolerance
        assert train_cfg.eval_every <= run.steps and 0 < train_cfg.warmup_steps < run.steps
    titans = {r.n_layers: r for r in runs if r.preset == "titans" and r.budget == 2e8}
    transformer = {r.n_layers: r for r in runs if r.preset == "transformer" and r.budget == 2e8}
    assert titans[2].flops_per_token > transformer[2].flops_per_token   # the memory's inner update
    assert titans[2].steps < transformer[2].steps

    write_plan(spec, runs, tmp_path)
    spec2, runs2 = read_plan(tmp_path)
    assert spec2 == spec and runs2 == runs
    record = OmegaConf.load(tmp_path / "runs" / runs[0].run_id / "run.yaml")
    assert record.config.train.steps == runs[0].steps and record.run.overrides == runs[0].overrides
    assert record.command[-1] == "train.resume=auto"
    assert len(json.loads((tmp_path / "plan.json").read_text())["runs"]) == len(runs)


def test_refuses_runs_too_short_for_their_budget_naming_them():
    with pytest.raises(ConfigError, match=r"transformer-C2e7-L2-d32: \d steps < min_steps=3"):
        plan_runs(_spec(budgets=[2e7, 6e8]), log=lambda _: None)
    with pytest.raises(ConfigError, match=r"transformer-C2e7-L1-d16: 6 steps give .* off budget 2e\+07 by more "
                       r"than flops_tolerance=0.05"):   # 6 * 64 tokens * 55K FLOPs: rounding costs 5.6%
        plan_runs(_spec(budgets=[2e7, 6e8]), log=lambda _: None)
    kept = plan_runs(_spec(budgets=[2e7, 6e8], drop_infeasible=True), log=lambda _: None)
    assert {r.run_id for r in kept} == {"transformer-C6e8-L1-d16", "transformer-C6e8-L2-d32"}


@pytest.mark.parametrize("change, message", [
    ({"budgets": [1e9, -1.0]}, "budgets: -1.0 is not a positive"),
    ({"budgets": []}, "budgets is empty"),
    ({"depths": [2, 2]}, r"depths=\[2, 2\] holds a duplicate"),
    ({"depths": [0]}, "depths: 0 must be >= 1"),
    ({"head_dim": 0}, "head_dim=0 must be >= 1"),
    ({"warmup_fraction": 1.5}, "warmup_fraction=1.5"),
    ({"presets": []}, "presets is empty"),
])
def test_spec_refuses_bad_values_by_name(change, message):
    with pytest.raises(ConfigError, match=message):
        _spec(**change)


def test_unknown_preset_and_unknown_spec_key_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'atals'"):
        plan_runs(_spec(presets=["atals"]), log=lambda _: None)
    path = tmp_path / "s.yaml"
    path.write_text("budgets: [1e9]\ndepths: [1]\nbudget: 3\n")
    with pytest.raises(ConfigError, match="budget"):
        load_spec(str(path))
    path.write_text("budgets: [1e9]\ndepths: [1]\n")
    assert load_spec(str(path), ["depths=[1,2]"]).depths == [1, 2]
    with pytest.raises(ConfigError, match="nor one of configs/sweep"):
        load_spec("no-such-sweep")


def test_shipped_sweep_configs_load():
    from megatron_atlas.configs import CONFIG_DIR
    names = sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml"))
    assert "tiny" in names
    for name in names:
        spec = load_spec(name)
        assert len(spec.budgets) >= 3 and len(spec.depths) >= 3, name   # three points per parabola
