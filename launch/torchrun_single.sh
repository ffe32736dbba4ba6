#!/usr/bin/env bash
# One node, N processes (one per GPU; on CPU, gloo processes):
#
#   launch/torchrun_single.sh --nproc 8 --model atlas_mag --size 760M --parallel zero2 train.lr=1.25e-3
#   launch/torchrun_single.sh --nproc 2 --model atlas --size tiny --train tiny   # CPU
#
# Arguments are those of `python -m megatron_atlas.train` (model=NAME or --model NAME, key=value
# overrides) plus --nproc N (default: $NPROC_PER_NODE, else the number of GPUs, else 1) and
# --dry-run (or DRY_RUN=1): print the command instead of running it. TORCHRUN overrides the
# torchrun command (default: torchrun).

set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
parse_args "$@"
cpu_environment
NPROC_PER_NODE=${NPROC_PER_NODE:-$(default_nproc)}
cd "$HERE/.."
read -r -a TORCHRUN_CMD <<< "${TORCHRUN:-torchrun}"
run_cmd "${TORCHRUN_CMD[@]}" --standalone --nnodes 1 --nproc_per_node "$NPROC_PER_NODE" \
  -m megatron_atlas.train "${TRAIN_ARGS[@]}"
