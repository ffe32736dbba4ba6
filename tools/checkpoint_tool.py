#!/usr/bin/env python
"""Checkpoint tools: consolidate a DeepSpeed checkpoint, reshard to another TP degree, inspect.

    python tools/checkpoint_tool.py consolidate RUN/checkpoints/step-00000100 OUT
        any ZeRO stage and TP degree -> OUT/state.pt (full, TP-free: state["model"] is the
        AtlasLM state dict) + OUT/config.yaml, the format `load_checkpoint` reads. Resume any
        layout from it with train.resume=OUT (weights, step and loader state; Adam moments restart).
    python tools/checkpoint_tool.py reshard SRC OUT --tp 4
        SRC (DeepSpeed or consolidated) -> OUT as above plus OUT/tp/model-tp{r}-of-{k}.pt, each TP
        rank's slice along the parameters' partition_dim.
    python tools/checkpoint_tool.py info PATH
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from megatron_atlas.atomic import removed_on_failure  # noqa: E402
from megatron_atlas.errors import FaultError  # noqa: E402
from megatron_atlas.train import checkpoint as ckpt  # noqa: E402
from megatron_atlas.train.manifest import write_manifest  # noqa: E402
from megatron_atlas.parallel.sharding import partition_dims, shard_state_dict  # noqa: E402


def _full_state(src: Path) -> dict:
    """A native-format state (model full and TP-free) from a DeepSpeed or a native checkpoint."""
    if ckpt.is_deepspeed_checkpoint(src) and not (src / ckpt.STATE_FILE).is_file():
        from megatron_atlas.train.consolidate import consolidate
        model, trainer = consolidate(src)
        return {"step": trainer["step"], "model": model, "loader": trainer["loader"],
                "partition_dims": trainer["partition_dims"], "consolidated_from": trainer["layout"]}
    return ckpt.load_checkpoint(src)


def _tp_free_config(src: Path) -> str:
    cfg = OmegaConf.load(src / "config.yaml")
    if "parallel" in cfg:
        cfg.parallel.tp, cfg.parallel.sequence_parallel = 1, False
    return OmegaConf.to_yaml(cfg)


def write_native(state: dict, config_yaml: str, out: Path) -> Path:
    """OUT/state.pt + OUT/config.yaml + OUT/manifest.json, written into OUT.tmp and renamed (atomic)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with removed_on_failure(tmp, str(out)):
        torch.save(state, tmp / ckpt.STATE_FILE)
        (tmp / "config.yaml").write_text(config_yaml)
        write_manifest(tmp)
    tmp.rename(out)
    return out


def consolidate_cmd(src: Path, out: Path) -> Path:
    print(f"consolidating {src} ...", flush=True)
    state = _full_state(src)
    path = write_native(state, _tp_free_config(src), out)
    n = sum(t.numel() for t in state["model"].values())
    print(f"wrote {path / ckpt.STATE_FILE}: step {state['step']}, {len(state['model'])} tensors, {n:,} values")
    return path


def _partition_dims_from_config(src: Path) -> dict:
    """TP split dims of the model the checkpoint's config.yaml describes (built on the meta device)."""
    from megatron_atlas.configs import RunConfig, to_model_config
    from megatron_atlas.model import build_model
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(src / "config.yaml"))
    with torch.device("meta"):
        return partition_dims(build_model(to_model_config(cfg)))


def reshard_cmd(src: Path, out: Path, tp: int) -> Path:
    state = _full_state(src)
    dims = state.get("partition_dims") or _partition_dims_from_config(src)
    config_yaml = OmegaConf.to_yaml(OmegaConf.merge(OmegaConf.create(_tp_free_config(src)),
                                                    {"parallel": {"tp": tp}}))
    path = write_native(state, config_yaml, out)   # resume reads the full dict and slices per rank
    (path / "tp").mkdir()
    for rank in range(tp):
        torch.save(shard_state_dict(state["model"], dims, rank, tp), path / "tp" / f"model-tp{rank}-of-{tp}.pt")
    print(f"wrote {path}: full state.pt and {tp} TP shards under {path / 'tp'}")
    return path


def info_cmd(src: Path) -> None:
    if ckpt.is_deepspeed_checkpoint(src):
        s = ckpt.load_deepspeed_state(src)
        print(f"DeepSpeed checkpoint: step {s['step']}, layout {s['layout']}, loader {s['loader']}")
    else:
        s = ckpt.load_checkpoint(src)
        print(f"native checkpoint: step {s['step']}, {len(s['model'])} tensors, loader {s.get('loader')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="DeepSpeed checkpoint -> full TP-free native checkpoint")
    c.add_argument("src", type=Path)
    c.add_argument("out", type=Path)
    r = sub.add_parser("reshard", help="checkpoint -> native checkpoint plus per-rank shards for --tp K")
    r.add_argument("src", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--tp", type=int, required=True)
    i = sub.add_parser("info", help="print a checkpoint's step, layout and loader state")
    i.add_argument("src", type=Path)
    args = parser.parse_args(argv)
    if args.command == "reshard" and args.tp < 1:
        parser.error(f"--tp={args.tp} must be >= 1")
    try:
        if args.command == "consolidate":
            consolidate_cmd(args.src, args.out)
        elif args.command == "reshard":
            reshard_cmd(args.src, args.out, args.tp)
        else:
            info_cmd(args.src)
    except (FaultError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
