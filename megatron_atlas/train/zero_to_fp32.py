#!/usr/bin/env python
"""zero_to_fp32.py of a megatron-atlas DeepSpeed checkpoint: DeepSpeed's command line, this project's
consolidation (any ZeRO stage, any tensor-parallel degree).

DeepSpeed copies its own `zero_to_fp32.py` into every checkpoint it saves; in this project's layout
(the engine's files under `step-XXXXXXXX/deepspeed/`, no `latest` file, TP ranks side by side) that
script fails or, under TP, would return rank 0's shards only. The training loop writes this file
over it, so the documented invocations work from the checkpoint folder:

    cd runs/x/checkpoints/step-00001000
    python zero_to_fp32.py . out/                         # out/pytorch_model.bin
    python zero_to_fp32.py . out/ --safe_serialization    # out/model.safetensors
    python zero_to_fp32.py . out/ --max_shard_size 2GB -t deepspeed

It writes the fp32 AtlasLM state dict (TP shards joined), sharded with an index above
--max_shard_size as DeepSpeed does. It needs megatron-atlas and deepspeed importable.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

TAG = "deepspeed"   # train.checkpoint.DEEPSPEED_TAG; repeated so the copied script imports nothing to parse args


def resolve_checkpoint(checkpoint_dir: str, tag: Optional[str]) -> Path:
    """The step folder for DeepSpeed's (checkpoint_dir, tag) pair; the tag folder itself is taken too."""
    path = Path(checkpoint_dir).resolve()
    if path.name == TAG and (path.parent / "trainer_state.pt").is_file():
        path = path.parent
    if tag is None and (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
    if tag not in (None, TAG):
        raise SystemExit(f"-t {tag}: this project's checkpoints keep the engine's files under the tag {TAG!r}")
    if not (path / TAG).is_dir() or not (path / "trainer_state.pt").is_file():
        raise SystemExit(f"{path}: not a megatron-atlas DeepSpeed checkpoint folder (needs {TAG}/ and "
                         "trainer_state.pt); pass the step-XXXXXXXX folder")
    return path


def write_state_dict(state_dict: dict, output_dir: Path, max_shard_size: str, safe_serialization: bool) -> list:
    """DeepSpeed's output layout: pytorch_model.bin or model.safetensors, or shards plus an index."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    pattern = "model{suffix}.safetensors" if safe_serialization else "pytorch_model{suffix}.bin"
    split = split_torch_state_dict_into_shards(state_dict, filename_pattern=pattern, max_shard_size=max_shard_size)
    output_dir.mkdir(parents=True, exist_ok=True)
    for filename, names in split.filename_to_tensors.items():
        shard = {n: state_dict[n].contiguous().clone() for n in names}   # tied weights: own storage each
        if safe_serialization:
            from safetensors.torch import save_file
            save_file(shard, str(output_dir / filename), metadata={"format": "pt"})
        else:
            torch.save(shard, output_dir / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        name = "model.safetensors.index.json" if safe_serialization else "pytorch_model.bin.index.json"
        (output_dir / name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


def replace_recovery_scripts(step_dir: Path) -> None:
    """This file in place of the zero_to_fp32.py DeepSpeed copied (ZeRO >= 1; written for ZeRO-0 too),
    and DeepSpeed's zero_to_torch.py, which fails here the same way, removed."""
    import shutil

    shutil.copyfile(Path(__file__), Path(step_dir) / "zero_to_fp32.py")
    (Path(step_dir) / "zero_to_fp32.py").chmod(0o755)
    (Path(step_dir) / "zero_to_torch.py").unlink(missing_ok=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint_dir", help="the step-XXXXXXXX folder (the one holding deepspeed/), e.g. .")
    p.add_argument("output_dir", help="folder for the fp32 state dict files")
    p.add_argument("--max_shard_size", default="5GB", help="largest file before sharding (e.g. 5GB, 500MB)")
    p.add_argument("--safe_serialization", action="store_true", help="write safetensors instead of pickle")
    p.add_argument("-t", "--tag", default=None, help=f"checkpoint tag; this project's is {TAG!r}")
    p.add_argument("--exclude_frozen_parameters", action="store_true",
                   help="accepted for compatibility: this project's models have no frozen parameters")
    p.add_argument("-d", "--debug", action="store_true", help="accepted for compatibility")
    args = p.parse_args(argv)
    step_dir = resolve_checkpoint(args.checkpoint_dir, args.tag)
    try:
        from megatron_atlas.train.consolidate import consolidate
    except ImportError as e:
        raise SystemExit(f"zero_to_fp32.py needs megatron-atlas and deepspeed importable ({e})") from None
    state_dict, trainer_state = consolidate(step_dir)
    files = write_state_dict(state_dict, Path(args.output_dir), args.max_shard_size, args.safe_serialization)
    layout = trainer_state["layout"]
    print(f"{step_dir} (ZeRO-{layout['zero_stage']}, tp {layout['tp']}) -> {args.output_dir}: "
          f"{len(state_dict)} tensors in {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
