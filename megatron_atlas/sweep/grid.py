"""The IsoFLOP plan: for every budget C and candidate depth, one model and its token count.

Size rule (one knob family, so the grid is a one-dimensional slice through model space):
    d_model  = aspect_ratio * n_layers, rounded to a multiple of head_dim (at least one head)
    n_heads  = d_model / head_dim
    ffn      = 8/3 d_model rounded to 64 (the size file's target_params is switched off)
Everything else (vocabulary, memory and attention settings) comes from the base size file.

Tokens: D = C / F where F = `training_flops_per_token(model, seq_len)` is counted from what the
architecture executes (memory inner updates, Newton-Schulz, attention), not 6N. Steps are D divided
by the tokens per step, rounded; a run is refused when rounding moves its FLOPs off the budget by more
than `flops_tolerance`, or when it would get fewer than `min_steps` steps.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from megatron_atlas.atomic import write_text_atomic
from megatron_atlas.configs import compose, to_model_config, to_train_config
from megatron_atlas.model.config import ConfigError, ModelConfig
from megatron_atlas.sweep.spec import SweepSpec

PLAN_FILE = "plan.json"
RUN_FILE = "run.yaml"


@dataclass(frozen=True)
class Shape:
    n_layers: int
    d_model: int
    n_heads: int


@dataclass
class PlannedRun:
    run_id: str
    preset: str
    budget: float                 # the FLOP budget this run belongs to
    n_layers: int
    d_model: int
    n_heads: int
    params: int                   # total parameters
    params_non_embedding: int
    flops_per_token: float
    tokens_per_step: int
    steps: int
    tokens: int                   # steps * tokens_per_step
    flops: float                  # tokens * flops_per_token (within flops_tolerance of budget)
    overrides: list[str]          # for compose(preset, size, train, overrides)
    size: str
    train: str

    def train_args(self, run_dir: Path) -> list[str]:
        """`python -m megatron_atlas.train` arguments of this run, writing into `run_dir`."""
        return [f"model={self.preset}", f"size={self.size}", f"train={self.train}", *self.overrides,
                f"train.out_dir={run_dir}", "train.resume=auto"]


def shape_for_depth(n_layers: int, aspect_ratio: int, head_dim: int) -> Shape:
    """The documented size rule (module docstring)."""
    if n_layers < 1 or aspect_ratio < 1 or head_dim < 1:
        raise ConfigError(f"size rule needs positive values: n_layers={n_layers}, "
                          f"aspect_ratio={aspect_ratio}, head_dim={head_dim}")
    heads = max(1, round(aspect_ratio * n_layers / head_dim))
    return Shape(n_layers, heads * head_dim, heads)


def budget_label(budget: float) -> str:
    """1e11 -> '1e11', 3.5e10 -> '3.5e10' (for run names)."""
    return f"{budget:.3g}".replace("e+", "e").replace("e0", "e")


def _shape_overrides(shape: Shape) -> list[str]:
    return [f"model.n_layers={shape.n_layers}", f"model.d_model={shape.d_model}",
            f"model.n_heads={shape.n_heads}", "model.head_dim=null", "model.ffn_hidden=0",
            "model.target_params=0"]


def model_costs(model_cfg: ModelConfig, seq_len: int) -> tuple[int, int, float]:
    """(total params, non-embedding params, training FLOPs per token), on the meta device."""
    from megatron_atlas.model import build_model, resolve_ffn_hidden   # torch only when planning
    from megatron_atlas.train.flops import training_flops_per_token
    model = build_model(model_cfg, device="meta")
    flops = training_flops_per_token(resolve_ffn_hidden(model_cfg), seq_len)
    return model.num_parameters(), model.num_parameters(exclude_embeddings=True), flops


def plan_runs(spec: SweepSpec, log: Callable[[str], None] = print,
              costs: Callable[[ModelConfig, int], tuple[int, int, float]] = model_costs) -> list[PlannedRun]:
    """Every (preset, budget, depth) run of the grid, checked against the budget; see module doc."""
    spec.validate()
    runs: list[PlannedRun] = []
    refused: list[str] = []
    for preset in spec.presets:
        for n_layers in spec.depths:
            shape = shape_for_depth(n_layers, spec.aspect_ratio, spec.head_dim)
            base = [*spec.overrides, *_shape_overrides(shape)]
            cfg = compose(preset, spec.size, spec.train, base)
            model_cfg, train_cfg = to_model_config(cfg), to_train_config(cfg)
            total, non_emb, fpt = costs(model_cfg, train_cfg.seq_len)
            log(f"{preset} L{shape.n_layers} d{shape.d_model} h{shape.n_heads}: {total:,} params "
                f"({non_emb:,} without embeddings), {fpt / 1e6:,.3f} MFLOP/token")
            for budget in spec.budgets:
                tps = train_cfg.tokens_per_step
                steps = round(budget / fpt / tps)
                name = f"{preset}-C{budget_label(budget)}-L{shape.n_layers}-d{shape.d_model}"
                flops = steps * tps * fpt
                if steps < spec.min_steps:
                    refused.append(f"{name}: {steps} steps < min_steps={spec.min_steps} "
                                   f"(budget {budget:.3g} / {fpt:.4g} FLOP/token / {tps} tokens per step)")
                    continue
                if abs(flops / budget - 1) > spec.flops_tolerance:
                    refused.append(f"{name}: {steps} steps give {flops:.4g} FLOPs, off budget {budget:.3g} "
                                   f"by more than flops_tolerance={spec.flops_tolerance}")
                    continue
                schedule = [f"train.steps={steps}",
                            f"train.warmup_steps={max(1, round(spec.warmup_fraction * steps)) if spec.warmup_fraction else 0}",
                            f"train.eval_every={max(1, steps // spec.evals_per_run)}",
                            f"train.save_every={max(1, steps // spec.checkpoints_per_run)}",
                            f"train.log_every={max(1, min(train_cfg.log_every, steps // 10))}"]
                overrides = [*base, *schedule]
                compose(preset, spec.size, spec.train, overrides)   # every run config must validate
                runs.append(PlannedRun(name, preset, float(budget), shape.n_layers, shape.d_model,
                                       shape.n_heads, total, non_emb, fpt, tps, steps, steps * tps,
                                       flops, overrides, spec.size, spec.train))
    if refused and not spec.drop_infeasible:
        raise ConfigError("infeasible runs in the plan (raise the budgets, drop depths, lower "
                          "tokens per step, or set drop_infeasible=true):\n  " + "\n  ".join(refused))
    for line in refused:
        log(f"dropped {line}")
    if not runs:
        raise ConfigError("the plan has no runs left")
    # smallest budgets first, so an interrupted sweep already has whole IsoFLOP curves to fit
    return sorted(runs, key=lambda r: (r.budget, spec.presets.index(r.preset), r.n_layers))


def write_plan(spec: SweepSpec, runs: list[PlannedRun], out: Path) -> Path:
    """`out/plan.json` (spec + runs) and `out/runs/<id>/run.yaml` (overrides + composed config)."""
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        run_dir = out / "runs" / run.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = compose(run.preset, run.size, run.train, [*run.overrides, f"train.out_dir={run_dir}"])
        record = {"run": dataclasses.asdict(run), "command": ["python", "-m", "megatron_atlas.train",
                                                             *run.train_args(run_dir)],
                  "config": OmegaConf.to_container(cfg, resolve=True)}
        write_text_atomic(run_dir / RUN_FILE, OmegaConf.to_yaml(OmegaConf.create(record)))
    plan = {"spec": dataclasses.asdict(spec), "runs": [dataclasses.asdict(r) for r in runs]}
    path = out / PLAN_FILE
    write_text_atomic(path, json.dumps(plan, indent=1))
    return path


def read_plan(out: Path) -> tuple[SweepSpec, list[PlannedRun]]:
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {PLAN_FILE} in {out}: run `tools/sweep.py plan --out {out}` first")
    data = json.loads(path.read_text())
    return SweepSpec(**data["spec"]), [PlannedRun(**r) for r in data["runs"]]


def plan_table(runs: list[PlannedRun]) -> str:
    lines = [f"{'run':<38} {'N(non-emb)':>11} {'MFLOP/tok':>10} {'steps':>7} {'tokens':>11} {'FLOPs/budget':>12}"]
    for r in runs:
        lines.append(f"{r.run_id:<38} {r.params_non_embedding:>11,} {r.flops_per_token / 1e6:>10.3f} "
                     f"{r.steps:>7,} {r.tokens:>11,} {r.flops / r.budget:>12.4f}")
    return "\n".join(lines)
