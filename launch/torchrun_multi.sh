#!/usr/bin/env bash
# Several nodes, started by hand (or by any scheduler): run this once on every node with
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun_multi.sh --nproc 8 \
#       --model atlas_mag --size 1.3B --parallel tp2_zero2
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun_multi.sh ...   (same args)
#
# NNODES, NODE_RANK and MASTER_ADDR are required; MASTER_PORT defaults to 29500. MASTER_ADDR is an
# address of node 0 that every node can reach. Same arguments as torchrun_single.sh (--nproc,
# --dry-run, model=... or --model ..., key=value overrides). NCCL settings: launch/README.md.

set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
parse_args "$@"
: "${NNODES:?set NNODES (the number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1; 0 on the node at MASTER_ADDR)}"
: "${MASTER_ADDR:?set MASTER_ADDR (an address of node 0 that every node reaches)}"
MASTER_PORT=${MASTER_PORT:-29500}
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || ((NODE_RANK >= NNODES)); then
  echo "error: NODE_RANK=$NODE_RANK must be in [0, NNODES=$NNODES)" >&2; exit 2
fi
cpu_environment
NPROC_PER_NODE=${NPROC_PER_NODE:-$(default_nproc)}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
cd "$HERE/.."
read -r -a TORCHRUN_CMD <<< "${TORCHRUN:-torchrun}"
run_cmd "${TORCHRUN_CMD[@]}" --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m megatron_atlas.train "${TRAIN_ARGS[@]}"
