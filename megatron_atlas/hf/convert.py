"""Native checkpoint <-> Hugging Face folder (DESIGN section 5).

    export_hf(CHECKPOINT, OUT)     config.json (+auto_map), vendored code, safetensors (+index), tokenizer
    import_hf(HF_DIR, OUT)         OUT/checkpoints/step-00000000 that `train.resume=` loads

A CHECKPOINT is a step-XXXXXXXX folder (native, or DeepSpeed of any ZeRO stage and TP degree, which
is consolidated on the fly by train.consolidate), a run folder (its latest checkpoint), or one
consolidated state-dict file (`torch.save` of the AtlasLM state dict, or of a dict holding it under "model", e.g.
the output of the ZeRO/TP consolidation tool) with the run's config.yaml beside it or given.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from omegaconf import OmegaConf

from megatron_atlas.atomic import removed_on_failure, replace_folder
from megatron_atlas.model import ModelConfig, build_model, resolve_ffn_hidden
from megatron_atlas.train.checkpoint import (STATE_FILE, checkpoint_dir, complete_checkpoints, find_latest,
                                             is_deepspeed_checkpoint, load_checkpoint, rng_state, save_checkpoint)
from megatron_atlas.train.config import TrainConfig
from megatron_atlas.train.safe_load import load_torch_file

ENTRY_MODULES = ("megatron_atlas.hf.configuration_atlas", "megatron_atlas.hf.modeling_atlas")
AUTO_MAP = {"AutoConfig": "configuration_atlas.AtlasConfig",
            "AutoModelForCausalLM": "modeling_atlas.AtlasForCausalLM"}
PREFIX = "model."


def _model_config(run_config: Dict[str, Any]) -> ModelConfig:
    from megatron_atlas.hf.configuration_atlas import model_config_from_dict

    if "model" not in run_config:
        raise ValueError("the run config has no `model` section")
    return resolve_ffn_hidden(model_config_from_dict(run_config["model"]))


class NativeCheckpoint(NamedTuple):
    cfg: ModelConfig
    weights: Dict[str, torch.Tensor]
    run_config: Dict[str, Any]
    step: Optional[int]          # None for a bare state-dict file that does not record it
    run_dir: Optional[Path]      # the run folder the checkpoint sits in (metrics.jsonl), if any


def read_native(checkpoint: str | Path, config: Optional[str | Path] = None) -> NativeCheckpoint:
    """A native checkpoint: run folder (its latest), step folder (native or DeepSpeed) or state-dict file."""
    path = Path(checkpoint)
    if path.is_dir() and not (path / STATE_FILE).is_file() and not is_deepspeed_checkpoint(path):
        latest = find_latest(path)
        if latest is None:
            raise FileNotFoundError(f"{path}: neither a checkpoint folder ({STATE_FILE}) nor a run folder "
                                    "with checkpoints/")
        path = latest
    run_dir = path.parent.parent if path.is_dir() and path.parent.name == "checkpoints" else None
    if path.is_dir() and is_deepspeed_checkpoint(path) and not (path / STATE_FILE).is_file():
        from megatron_atlas.train.consolidate import consolidate   # needs deepspeed

        weights, trainer_state = consolidate(path)
        state = {"model": weights, "step": trainer_state.get("step")}
        config_file = Path(config) if config else path / "config.yaml"
    elif path.is_dir():
        state = load_checkpoint(path)
        config_file = Path(config) if config else path / "config.yaml"
    elif path.is_file():
        state = load_torch_file(path)
        config_file = Path(config) if config else path.parent / "config.yaml"
    else:
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: the run config (model + train) is needed; pass --config")
    run_config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    holder = isinstance(state, dict) and "model" in state
    weights = state["model"] if holder else state
    step = state.get("step") if holder else None
    return NativeCheckpoint(_model_config(run_config), weights, run_config, step, run_dir)


def load_native(checkpoint: str | Path, config: Optional[str | Path] = None
                ) -> Tuple[ModelConfig, Dict[str, torch.Tensor], Dict[str, Any]]:
    """(resolved model config, AtlasLM state dict, run config as a dict) of a native checkpoint."""
    native = read_native(checkpoint, config)
    return native.cfg, native.weights, native.run_config


def build_hf_model(cfg: ModelConfig, weights: Dict[str, torch.Tensor], train: Optional[dict] = None,
                   special: Optional[Dict[str, Optional[int]]] = None):
    """The HF wrapper (this repo's copy of the class) holding `weights`; `special`: eos/bos/pad ids."""
    from transformers import GenerationConfig

    from megatron_atlas.hf.configuration_atlas import AtlasConfig
    from megatron_atlas.hf.modeling_atlas import AtlasForCausalLM

    special = {k: v for k, v in (special or {}).items() if v is not None}
    config = AtlasConfig(atlas=dataclasses.asdict(cfg), atlas_train=train, **special)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["AtlasForCausalLM"]
    with torch.device("meta"):
        model = AtlasForCausalLM(config)
    model.model.load_state_dict(weights, strict=True, assign=True)
    model.tie_weights()
    # generate() stops at the end-of-document token and pads finished rows with pad
    model.generation_config = GenerationConfig(**special)
    return model.eval()


def export_hf(checkpoint: str | Path, out: str | Path, max_shard_size: str | int = "2GB",
              tokenizer: Optional[str] = None, config: Optional[str | Path] = None,
              log=print) -> Path:
    """Write the export into a temporary sibling of `out`, then put it in place of `out`."""
    out = Path(out)
    replacing = _check_replaceable(out)
    native = read_native(checkpoint, config)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with removed_on_failure(tmp, str(out)):
        files = _write_export(native, tmp, max_shard_size, tokenizer, log)
    replace_folder(tmp, out)   # a re-export leaves no stale weights or index of the earlier one
    if replacing:
        log(f"replaced the earlier export in {out}")
    log(f"wrote weights, config.json, generation_config.json and README.md; vendored {len(files)} source files")
    return out


def _check_replaceable(out: Path) -> bool:
    """True when `out` holds an earlier export of this project (replaced as a whole); an empty or
    missing folder is fine; anything else is refused rather than mixed with the export."""
    from megatron_atlas.hf.configuration_atlas import AtlasConfig

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    try:
        ours = json.loads((out / "config.json").read_text()).get("model_type") == AtlasConfig.model_type
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise FileExistsError(f"{out} exists and is not an export of this project (no config.json with "
                              f"model_type {AtlasConfig.model_type!r}); choose a new or empty folder")
    return True


def _write_export(native: NativeCheckpoint, out: Path, max_shard_size: str | int, tokenizer: Optional[str],
                  log) -> list:
    """Everything of an export into the (empty) folder `out`; returns the vendored file names."""
    from megatron_atlas.hf.model_card import model_card, read_training_facts
    from megatron_atlas.hf.tokenizer import load_tokenizer, resolve_tokenizer_file, save_hf_tokenizer
    from megatron_atlas.hf.vendor import vendor

    cfg, run_config = native.cfg, native.run_config
    trained_length = (run_config.get("train") or {}).get("seq_len")
    tok_file = resolve_tokenizer_file(tokenizer, run_config)
    special: Dict[str, Optional[int]] = {}
    if tok_file is None and cfg.vocab_size < 256:
        log(f"no tokenizer written: no tokenizer.json given and vocab_size={cfg.vocab_size} < 256 bytes")
    else:
        special = save_hf_tokenizer(load_tokenizer(tokenizer, run_config), out, cfg.vocab_size, trained_length)
        log(f"tokenizer: {tok_file or 'byte-level (id = byte)'}")
    model = build_hf_model(cfg, native.weights, run_config.get("train"), special)
    model.save_pretrained(str(out), max_shard_size=max_shard_size, safe_serialization=True)
    files = vendor(ENTRY_MODULES, out)
    facts = read_training_facts(native.run_dir, native.step)
    (out / "README.md").write_text(model_card(cfg, model.model.num_parameters(), run_config.get("train"),
                                              facts, trained_length, special))
    _readable_by_all(out)
    return files


def _readable_by_all(folder: Path) -> None:
    """Files as a plain `cp` or `git clone` leaves them (0644): some writers create theirs 0600,
    which other users of a shared model folder then cannot read."""
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o644)


def _read_safetensors(hf_dir: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    weights: Dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(str(hf_dir / name)))
    return weights


def load_hf_weights(hf_dir: str | Path) -> Tuple[ModelConfig, Dict[str, torch.Tensor], Optional[dict]]:
    """(model config, AtlasLM state dict, training config of the exported run) of an HF folder."""
    from megatron_atlas.hf.configuration_atlas import AtlasConfig

    hf_dir = Path(hf_dir)
    config = AtlasConfig.from_pretrained(str(hf_dir))
    cfg = resolve_ffn_hidden(config.model_config())
    stored = _read_safetensors(hf_dir)
    bad = [k for k in stored if not k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"{hf_dir}: unexpected tensor names {bad[:3]} (expected the prefix {PREFIX!r})")
    weights = {k[len(PREFIX):]: v for k, v in stored.items()}
    if cfg.tie_embeddings:
        weights.setdefault("lm_head.weight", weights["embed.weight"])
    return cfg, weights, config.atlas_train


def _check_new_run_folder(out: Path) -> None:
    """An import starts a run: into a folder holding one it would repoint `latest` and overwrite
    config.yaml, so that is refused."""
    held = [name for name in ("config.yaml", "metrics.jsonl") if (out / name).exists()]
    held += complete_checkpoints(checkpoint_dir(out))
    if held:
        raise FileExistsError(f"{out} already holds a run ({', '.join(held[:4])}); importing into it would "
                              "repoint its `latest` checkpoint and overwrite its config.yaml: choose a new folder")


def import_hf(hf_dir: str | Path, out_dir: str | Path, seed: Optional[int] = None,
              micro_batch_size: Optional[int] = None, log=print) -> Path:
    """Write OUT/checkpoints/step-00000000: the weights, a fresh optimizer state, step 0.

    `python -m megatron_atlas.train ... train.out_dir=OUT train.resume=auto` (or train.resume=<the
    step folder>) then continues training from these weights with a new optimizer and schedule;
    the run must use the same train.seed (data order) as written here (the exported run's, or the
    one given), because the resume check insists on it; the loader state is that of one DP rank.
    """
    from megatron_atlas.train.data import fresh_state
    from megatron_atlas.train.optim import build_optimizer

    _check_new_run_folder(Path(out_dir))
    cfg, weights, train = load_hf_weights(hf_dir)
    train_cfg = OmegaConf.structured(TrainConfig)
    if train:
        train_cfg = OmegaConf.merge(train_cfg, train)
    train_cfg.out_dir = str(out_dir)
    if seed is not None:
        train_cfg.seed = seed
    if micro_batch_size is not None:
        train_cfg.micro_batch_size = micro_batch_size
    train_cfg = OmegaConf.to_object(train_cfg)
    model = build_model(cfg)
    model.load_state_dict(weights, strict=True)
    loader = fresh_state(train_cfg.data, seed=train_cfg.seed, micro_batch_size=train_cfg.micro_batch_size,
                         dp_size=1)
    state = {"step": 0, "model": model.state_dict(), "optimizer": build_optimizer(model, train_cfg).state_dict(),
             "rng": rng_state(), "loader": loader}
    config_yaml = OmegaConf.to_yaml({"model": cfg, "train": train_cfg})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "config.yaml").write_text(config_yaml)
    path = save_checkpoint(Path(out_dir), 0, state, config_yaml, keep_last=0)
    log(f"wrote {path} (model {cfg.preset}, step 0, fresh optimizer; seed {train_cfg.seed}, "
        f"micro_batch_size {train_cfg.micro_batch_size})")
    return path
