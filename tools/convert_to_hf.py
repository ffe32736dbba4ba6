#!/usr/bin/env python
"""Export a native checkpoint to a Hugging Face folder (DESIGN section 5).

CHECKPOINT: a run folder (its latest checkpoint), a step-XXXXXXXX folder (native, or DeepSpeed of
any ZeRO stage and TP degree: consolidated on the fly, needs deepspeed), or one state-dict file (the
AtlasLM state dict, or a dict holding it under "model", e.g. from `tools/checkpoint_tool.py
consolidate`) with the run's config.yaml beside it or given by --config.

OUT gets config.json (with auto_map), the vendored model code, safetensors weights (sharded, with
model.safetensors.index.json, above --max-shard-size) and tokenizer files. Load it with
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True); AutoTokenizer.from_pretrained(OUT)
which needs transformers and torch, not this project.

    python tools/convert_to_hf.py runs/atlas-tiny hf/atlas-tiny
    python tools/convert_to_hf.py runs/x/checkpoints/step-00001000 hf/x --max-shard-size 500MB
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_atlas.errors import FaultError  # noqa: E402
from megatron_atlas.hf.convert import export_hf  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder, step folder, or state-dict file")
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 2GB, 500MB")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or a folder holding one); default: "
                   "the run's shard folder's, else the byte-level tokenizer (id = byte)")
    p.add_argument("--config", default=None, help="the run's config.yaml (default: beside the checkpoint)")
    args = p.parse_args(argv)
    try:
        out = export_hf(args.checkpoint, args.out, args.max_shard_size, args.tokenizer, args.config)
    except (FaultError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
