"""`python -m megatron_atlas.train model=NAME size=NAME [train=NAME] [key=value ...]`"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_atlas.configs import available, parse_cli, to_model_config, to_parallel_config, to_train_config
from megatron_atlas.errors import FaultError
from megatron_atlas.model.config import ConfigError

USAGE = """\
usage: python -m megatron_atlas.train model=NAME size=NAME [train=NAME] [parallel=NAME] [KEY=VALUE ...]

Train a language model. The run configuration is composed from four YAML files and then overrides:
  configs/model/NAME.yaml     the architecture preset   {models}
  configs/size/NAME.yaml      width, depth, vocabulary  {sizes}
  configs/train/NAME.yaml     the recipe (default: default)  {trains}
  configs/parallel/NAME.yaml  the process layout (default: default)  {parallels}

Overrides are dotted keys with YAML values and win over the files, e.g.
  train.lr=1e-3  train.steps=50  train.schedule=wsd  model.n_layers=4  model.memory.window=2
  train.data.mqar.num_kv_pairs=8  train.device=cpu  train.out_dir=runs/try1
Sections: model.* (model.memory.*, model.attention.*), train.* (train.data.*) and parallel.*
(tp, cp, sequence_parallel, zero_stage, deepspeed, engine, activation_checkpointing). An unknown key
or a bad value stops the run with a message naming it.

Several processes: start the same command under torchrun or srun (see launch/README.md). The
data-parallel size is world size / parallel.tp; train.micro_batch_size is per DP rank. One process
with parallel.zero_stage=0 is plain PyTorch; anything else trains through DeepSpeed with
configs/deepspeed/zero<stage>.json. Only rank 0 logs and writes metrics.

Outputs in train.out_dir: config.yaml (the resolved configuration), metrics.jsonl (one JSON
record per log line, eval, skipped step and the final summary) and checkpoints/ (every
train.save_every steps and at the end; written atomically, `latest` updated last, the newest
train.keep_last kept). train.resume=auto continues from the latest checkpoint in train.out_dir
(bit-exact on CPU); train.exit_at_step=N stops after step N with a checkpoint, for time-limited jobs.

examples:
  python -m megatron_atlas.train model=atlas size=tiny train=tiny          # CPU demo, 1-3 minutes
  python -m megatron_atlas.train model=titans size=tiny train=tiny train.steps=100
  python -m megatron_atlas.train model=atlas_mag size=170M                 # paper recipe
  python -m megatron_atlas.train model=atlas_mag size=170M train.save_every=500 train.resume=auto
  torchrun --nproc_per_node 2 -m megatron_atlas.train model=atlas size=tiny train=tiny parallel=zero2
"""


def usage() -> str:
    return USAGE.format(**{f"{g}s": ", ".join(available(g)) for g in ("model", "size", "train", "parallel")})


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(usage())
        return 0
    try:
        cfg = parse_cli(argv)
        model_cfg, train_cfg, parallel_cfg = to_model_config(cfg), to_train_config(cfg), to_parallel_config(cfg)
        from megatron_atlas.train.loop import train   # torch import only once the config is good
        from megatron_atlas.train.preflight import out_of_memory_message, preflight
        preflight(model_cfg, train_cfg, parallel_cfg)
        try:
            train(model_cfg, train_cfg, parallel_cfg=parallel_cfg)
        except (MemoryError, RuntimeError) as e:
            message = out_of_memory_message(e, model_cfg, train_cfg)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            return 1
    except ConfigError as e:   # from the files and overrides, or once the data are opened
        print(f"config error: {e}\n(see python -m megatron_atlas.train --help)", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    except FaultError as e:   # a damaged checkpoint or shard, a full disk, a busy run folder
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
