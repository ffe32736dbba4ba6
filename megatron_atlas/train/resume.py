"""Which checkpoint a run resumes from, and whether this run's model can take it.

    select_resume(train.resume, out_dir, log)   none | auto | a path -> the checkpoint folder or None
    check_model_matches(path, model_cfg)        ConfigError when the checkpoint is another model's

`auto` takes the newest checkpoint that verifies (manifest checksums, or zip CRCs for checkpoints
older than manifests) and logs which one and why newer ones were passed over; it fails, rather than
silently starting over, when checkpoints exist but none verifies. A named path is verified and used
as it is, or refused with the reason.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import OmegaConf

from megatron_atlas.errors import CheckpointError
from megatron_atlas.model.config import ConfigError, ModelConfig
from megatron_atlas.train.checkpoint import (checkpoint_dir, complete_checkpoints, find_latest, is_complete,
                                             verify_checkpoint)


def _named(path: Path) -> Path:
    if not path.exists():
        raise ConfigError(f"train.resume={path}: no such checkpoint folder (give a step-XXXXXXXX folder, "
                          "auto or none)")
    if not is_complete(path):
        latest = find_latest(path)
        hint = (f"; its newest checkpoint is {latest}, or resume it with train.out_dir={path} "
                "train.resume=auto") if latest else ""
        raise ConfigError(f"train.resume={path} is not a checkpoint folder (no state.pt or trainer_state.pt)"
                          f"{hint}")
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointError(f"train.resume={path} does not verify: {problem}")
    return path


def select_resume(resume: str, out_dir: Path, log: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint `train.resume` selects (None: start from step 0), verified."""
    if resume == "none":
        return None
    if resume != "auto":
        return _named(Path(resume))
    root = checkpoint_dir(out_dir)
    skipped: list[str] = []
    for name in reversed(complete_checkpoints(root)):
        problem = verify_checkpoint(root / name)
        if problem is None:
            if skipped:
                log(f"resume=auto: passed over {len(skipped)} newer checkpoint(s) that do not verify: "
                    + "; ".join(skipped))
            log(f"resume=auto: resuming from {root / name}, the newest checkpoint that verifies")
            return root / name
        skipped.append(f"{name}: {problem}")
    if skipped:
        raise CheckpointError(f"resume=auto: none of the {len(skipped)} checkpoints in {root} verifies ("
                              + "; ".join(skipped) + "); move them aside to start over, or name one with "
                              "train.resume=PATH")
    log(f"resume=auto: no checkpoint under {out_dir}; starting from step 0")
    return None


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}.{key}"))
        return out
    return {prefix: tree}


def _shapes(cfg: ModelConfig) -> dict[str, tuple]:
    import torch

    from megatron_atlas.model import build_model
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def check_model_matches(path: Path, model_cfg: ModelConfig) -> None:
    """ConfigError when the checkpoint's model (its config.yaml) has other tensors than `model_cfg`
    builds (names or shapes), naming the settings that differ. Nothing is checked without a config."""
    from megatron_atlas.hf.configuration_atlas import model_config_from_dict

    config = Path(path) / "config.yaml"
    if not config.is_file():
        return
    saved_dict = (OmegaConf.to_container(OmegaConf.load(config), resolve=True) or {}).get("model")
    if not saved_dict:
        return
    try:
        saved = model_config_from_dict(saved_dict)
    except (TypeError, ValueError):   # written by another version of the schema: the load will tell
        return
    theirs, ours = _shapes(saved), _shapes(model_cfg)
    if theirs == ours:
        return
    a, b = _flat(dataclasses.asdict(saved), "model"), _flat(dataclasses.asdict(model_cfg), "model")
    settings = [f"{k}={a.get(k)!r} (this run: {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    tensors = sorted(set(theirs) ^ set(ours)) or sorted(k for k in ours if theirs[k] != ours[k])
    raise ConfigError(f"checkpoint {path} is of another model: {', '.join(settings) or 'its settings'}; "
                      f"tensors that differ: {', '.join(tensors[:4])}{' ...' if len(tensors) > 4 else ''}. "
                      "Resume with the same model=/size= settings, or use another train.out_dir")
