"""Compose run configurations from `configs/{model,size,train}/*.yaml` and `key=value` overrides.

The typed dataclasses (`ModelConfig`, `TrainConfig`) are the schema: every YAML entry and every
override is checked against it one key at a time, so a typo or a value of the wrong type is reported
with its key, its source and what would have been accepted, as a `ConfigError`.

    cfg = compose("atlas", "tiny", "tiny", ["train.lr=1e-3", "model.n_layers=4"])
    model_cfg, train_cfg = to_model_config(cfg), to_train_config(cfg)
"""
from __future__ import annotations

import difflib
import functools
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_atlas.model.config import ConfigError, ModelConfig
from megatron_atlas.train.config import ParallelConfig, TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "size", "train", "parallel")   # the file groups, merged in this order
CLI_DEFAULTS = {"train": "default", "parallel": "default"}   # groups a command line may leave out


@dataclass
class RunConfig:
    """The composed configuration: the schema every file and override is checked against."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def available(group: str, config_dir: Optional[Path] = None) -> list[str]:
    """Names of the YAML files of one group (`model`, `size`, `train` or `parallel`), sorted."""
    return sorted(p.stem for p in (Path(config_dir or CONFIG_DIR) / group).glob("*.yaml"))


def compose(model: str, size: str, train: str = "default", overrides: Sequence[str] = (),
            config_dir: Optional[Path] = None, parallel: str = "default") -> DictConfig:
    """Schema defaults <- model preset <- size <- train recipe <- parallel layout <- overrides; validated."""
    cfg = OmegaConf.structured(RunConfig)
    for group, name in zip(GROUPS, (model, size, train, parallel)):
        path = _group_file(group, name, config_dir)
        _apply(cfg, _flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False)), str(path))
    _apply(cfg, [_parse_override(item) for item in overrides], "override")
    # Fail here, not at the first use: both sections must convert and validate.
    to_model_config(cfg)
    to_train_config(cfg)
    to_parallel_config(cfg, config_dir)
    return cfg


def parse_cli(argv: Sequence[str], config_dir: Optional[Path] = None) -> DictConfig:
    """`model=NAME size=NAME [train=NAME] [parallel=NAME] [a.b=c ...]` -> composed config."""
    selected: dict[str, str] = dict(CLI_DEFAULTS)
    overrides: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}: settings are key=value (e.g. train.lr=1e-3); "
                              "see --help")
        if sep and key in GROUPS:
            selected[key] = value
        else:
            overrides.append(arg)
    missing = [g for g in GROUPS if g not in selected]
    if missing:
        raise ConfigError("missing " + ", ".join(
            f"{g}=NAME (one of {', '.join(available(g, config_dir))})" for g in missing))
    return compose(selected["model"], selected["size"], selected["train"], overrides, config_dir,
                   parallel=selected["parallel"])


def to_model_config(cfg: DictConfig) -> ModelConfig:
    return _to_dataclass(cfg.model).validate()


def to_train_config(cfg: DictConfig) -> TrainConfig:
    return _to_dataclass(cfg.train).validate()


def to_parallel_config(cfg: DictConfig, config_dir: Optional[Path] = None) -> ParallelConfig:
    parallel = _to_dataclass(cfg.parallel).validate()
    needs_deepspeed = parallel.engine == "deepspeed" or parallel.zero_stage > 0
    if needs_deepspeed or parallel.deepspeed:
        deepspeed_config_path(parallel.deepspeed_config_name, config_dir)   # fail now if it is missing
    return parallel


def deepspeed_config_path(name: str, config_dir: Optional[Path] = None) -> Path:
    """configs/deepspeed/NAME.json (the ZeRO and communication knobs; batch sizes come from train.*)."""
    path = Path(config_dir or CONFIG_DIR) / "deepspeed" / f"{name}.json"
    if not path.is_file():
        names = sorted(p.stem for p in path.parent.glob("*.json"))
        raise ConfigError(f"parallel.deepspeed={name!r}: no {path}; available: {', '.join(names) or 'none'}")
    return path


def _to_dataclass(node: DictConfig) -> Any:
    try:
        return OmegaConf.to_object(node)   # resolves ${...} against the whole run config
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve {e.full_key}: {e.msg.splitlines()[0]}") from None


def _group_file(group: str, name: str, config_dir: Optional[Path]) -> Path:
    path = Path(config_dir or CONFIG_DIR) / group / f"{name}.yaml"
    if not path.is_file():
        names = available(group, config_dir)
        hint = difflib.get_close_matches(name, names, n=1)
        raise ConfigError(f"unknown {group} {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; available: {', '.join(names)}")
    return path


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"malformed override {item!r}: expected key=value, e.g. train.lr=1e-3")
    # omegaconf's YAML loader: 1e-3 is a float, null is None, [1, 2] a list.
    try:
        parsed = OmegaConf.from_dotlist([f"v={raw}"])
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value {raw!r} is not valid YAML "
                          f"({getattr(e, 'problem', None) or e})") from None
    return key.strip(), OmegaConf.to_container(parsed, resolve=False)["v"]


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts -> (dotted key, leaf value) pairs, so files and overrides take one path."""
    if not isinstance(tree, dict):
        return [(prefix, tree)]
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        items += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return items


def _apply(cfg: DictConfig, items: Iterable[tuple[str, Any]], source: str) -> None:
    for key, value in items:
        if isinstance(value, dict):   # e.g. model.memory={kind: linear}
            _apply(cfg, _flatten(value, key), source)
            continue
        expected = _leaf_type(key, source)
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException:
            raise ConfigError(f"{key}={value!r} ({source}) is not valid: expected "
                              f"{_describe(expected)}") from None


@functools.lru_cache(maxsize=None)
def _schema_leaves(cls: type = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key of the schema -> its annotated type."""
    leaves: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if is_dataclass(tp):
            leaves.update(_schema_leaves(tp, f"{key}."))
        else:
            leaves[key] = tp
    return leaves


def _leaf_type(key: str, source: str) -> Any:
    leaves = _schema_leaves()
    if key in leaves:
        return leaves[key]
    sections = sorted({k.rsplit(".", 1)[0] for k in leaves if "." in k})
    if key in sections:
        inner = [k for k in leaves if k.startswith(key + ".")]
        raise ConfigError(f"{key} ({source}) is a section, not a value; set one of its keys: "
                          f"{', '.join(inner)}")
    parent, _, tail = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in leaves if k.rpartition(".")[0] == parent}
    hints = [siblings[name] for name in difflib.get_close_matches(tail, list(siblings), n=3)]
    hints += [k for k in leaves if k.rpartition(".")[2] == tail and k not in hints]   # wrong section
    hints = hints or difflib.get_close_matches(key, list(leaves), n=3, cutoff=0.6)
    raise ConfigError(f"unknown key {key!r} ({source})" + (
        f"; did you mean {', '.join(hints)}?" if hints else "; top-level sections are model, train and parallel"))


def _describe(tp: Any) -> str:
    """A schema type in words, for error messages."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return _describe(next(a for a in args if a is not type(None))) + " or null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))
