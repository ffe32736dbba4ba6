#!/usr/bin/env python
"""Turn an exported Hugging Face folder back into a native checkpoint to continue training.

Writes OUT/checkpoints/step-00000000 (the weights, a fresh AdamW state, step 0, a fresh loader
state) and OUT/config.yaml (the model config, and the exported run's training config with
train.out_dir=OUT). Continue with
    python -m megatron_atlas.train model=PRESET size=SIZE ... train.out_dir=OUT train.resume=auto
whose model settings must match OUT/config.yaml; the optimizer and the schedule start fresh, and the
run must use the data-order seed written here (the exported run's train.seed, or --seed).

    python tools/convert_from_hf.py hf/atlas-tiny runs/atlas-cont
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_atlas.errors import FaultError  # noqa: E402
from megatron_atlas.hf.convert import import_hf  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="a folder written by tools/convert_to_hf.py")
    p.add_argument("out", help="run folder to create (gets checkpoints/ and config.yaml)")
    p.add_argument("--seed", type=int, default=None, help="train.seed of the continuing run")
    p.add_argument("--micro-batch-size", type=int, default=None)
    args = p.parse_args(argv)
    try:
        import_hf(args.hf_dir, args.out, seed=args.seed, micro_batch_size=args.micro_batch_size)
    except (FaultError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
