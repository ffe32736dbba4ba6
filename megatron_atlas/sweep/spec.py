"""The sweep configuration: which architectures, budgets and depths, and how each run trains.

Loaded from `configs/sweep/NAME.yaml` (or any path) plus `key=value` overrides, checked against the
`SweepSpec` schema so a typo or a bad value stops with the key named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_atlas.configs import CONFIG_DIR
from megatron_atlas.model.config import ConfigError


@dataclass
class SweepSpec:
    name: str = "sweep"
    presets: list[str] = field(default_factory=lambda: ["transformer"])   # configs/model/*.yaml
    size: str = "tiny"                # base size: vocabulary and memory/attention settings
    train: str = "tiny"               # training recipe (configs/train/*.yaml)
    budgets: list[float] = field(default_factory=list)    # training FLOPs per run
    depths: list[int] = field(default_factory=list)       # candidate n_layers, one model size each
    aspect_ratio: int = 32            # d_model = aspect_ratio * n_layers (rounded to head_dim)
    head_dim: int = 16                # n_heads = d_model / head_dim
    overrides: list[str] = field(default_factory=list)    # key=value for every run
    warmup_fraction: float = 0.1      # warmup steps = this share of each run's steps
    evals_per_run: int = 4            # evaluations spread over each run (the last at its end)
    checkpoints_per_run: int = 1      # checkpoints spread over each run (1: only at the end)
    min_steps: int = 20               # a run with fewer optimizer steps is refused (or dropped)
    flops_tolerance: float = 0.05     # |planned FLOPs / budget - 1| allowed after rounding steps
    drop_infeasible: bool = False     # drop runs under min_steps instead of refusing the plan
    data_prep: Optional[list[str]] = None   # tools/prepare_data.py args when the shards are missing

    def validate(self) -> "SweepSpec":
        if not self.presets:
            raise ConfigError("presets is empty: name at least one of configs/model/*.yaml")
        if not self.budgets:
            raise ConfigError("budgets is empty: give training FLOPs per run, e.g. [1e10, 3e10, 1e11]")
        for b in self.budgets:
            if not b > 0:
                raise ConfigError(f"budgets: {b!r} is not a positive FLOP count")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"budgets={self.budgets} holds a duplicate")
        if not self.depths:
            raise ConfigError("depths is empty: give candidate n_layers, e.g. [1, 2, 3]")
        for d in self.depths:
            if d < 1:
                raise ConfigError(f"depths: {d!r} must be >= 1")
        if len(set(self.depths)) != len(self.depths):
            raise ConfigError(f"depths={self.depths} holds a duplicate")
        for key in ("aspect_ratio", "head_dim", "evals_per_run", "checkpoints_per_run", "min_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)!r} must be >= 1")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction={self.warmup_fraction!r} must be in [0, 1)")
        if not 0.0 < self.flops_tolerance < 1.0:
            raise ConfigError(f"flops_tolerance={self.flops_tolerance!r} must be in (0, 1)")
        for item in self.overrides:
            if not isinstance(item, str):
                raise ConfigError(f"overrides: {item!r} is not a KEY=VALUE string, e.g. overrides=[train.lr=1e-3]")
        return self


def resolve_spec_path(name_or_path: str) -> Path:
    """A YAML path, or the name of one in configs/sweep/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    named = CONFIG_DIR / "sweep" / f"{name_or_path}.yaml"
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml")))
    raise ConfigError(f"sweep config {name_or_path!r} is neither a file nor one of configs/sweep/: {known}")


def load_spec(name_or_path: str, overrides: Sequence[str] = ()) -> SweepSpec:
    """Schema defaults <- YAML <- `key=value` overrides (YAML values, e.g. budgets=[1e10,1e11])."""
    path = resolve_spec_path(name_or_path)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(SweepSpec), OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"malformed sweep override {item!r}: expected key=value, e.g. depths=[1,2]")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        spec = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"sweep config {path}: {e.msg.splitlines()[0]} (key {e.full_key})") from None
    except yaml.YAMLError as e:   # a value that is not YAML, in the file or in an override
        where = getattr(e, "problem_mark", None)
        raise ConfigError(f"sweep config {path} or its overrides ({' '.join(overrides) or 'none'}): not valid "
                          f"YAML ({getattr(e, 'problem', None) or e}{f', column {where.column + 1}' if where else ''})"
                          ) from None
    return spec.validate()
