# Shared by the launchers (sourced). Turns the command line into TRAIN_ARGS for
# `python -m megatron_atlas.train`, and runs or (DRY_RUN=1 / --dry-run) prints commands.
#
#   --model NAME --size NAME --train NAME --parallel NAME  (or model=NAME ...: both are accepted)
#   --nproc N      processes per node (default: $NPROC_PER_NODE, else the GPU count, else 1)
#   --dry-run      print the commands instead of running them
#   key=value      overrides, passed through unchanged (train.lr=1e-3 parallel.zero_stage=2 ...)

TRAIN_ARGS=()
DRY_RUN=${DRY_RUN:-0}

launcher_usage() {
  awk 'NR > 1 && /^#( |$)/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$1"
}

parse_args() {
  while (($#)); do
    case "$1" in
      --model|--size|--train|--parallel)
        [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
        TRAIN_ARGS+=("${1#--}=$2"); shift 2 ;;
      --model=*|--size=*|--train=*|--parallel=*) TRAIN_ARGS+=("${1#--}"); shift ;;
      --nproc|--nproc_per_node|--nproc-per-node)
        [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
        NPROC_PER_NODE=$2; shift 2 ;;
      --nproc=*|--nproc_per_node=*|--nproc-per-node=*) NPROC_PER_NODE=${1#*=}; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) launcher_usage "$0"; exit 0 ;;
      -*) echo "error: unknown option $1 (settings are key=value; see --help)" >&2; exit 2 ;;
      *) TRAIN_ARGS+=("$1"); shift ;;
    esac
  done
  if ((${#TRAIN_ARGS[@]} == 0)); then
    echo "error: no run given, e.g. --model atlas --size tiny --train tiny (see --help)" >&2; exit 2
  fi
}

# GPUs this process may use: the GPU lines of `nvidia-smi -L` (its MIG lines are instances of
# those GPUs, not more GPUs), limited by CUDA_VISIBLE_DEVICES when it is set (CUDA enumerates its
# entries up to the first invalid one; "" or "-1" hides every GPU); 0 without nvidia-smi.
gpu_count() {
  local physical=0 visible=0 entry
  if command -v nvidia-smi >/dev/null 2>&1; then
    physical=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
  if [[ -z "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    echo "$physical"; return
  fi
  local entries=()
  IFS=',' read -r -a entries <<< "$CUDA_VISIBLE_DEVICES"
  for entry in "${entries[@]}"; do
    entry=${entry//[[:space:]]/}
    [[ "$entry" =~ ^([0-9]+|GPU-.+|MIG-.+)$ ]] || break
    visible=$((visible + 1))
  done
  echo $((visible < physical ? visible : physical))
}

default_nproc() {
  local gpus
  gpus=$(gpu_count)
  echo $((gpus > 0 ? gpus : 1))
}

# On CPU-only machines DeepSpeed must be told to use its CPU accelerator (gloo).
cpu_environment() {
  if (( $(gpu_count) == 0 )); then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  fi
}

run_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}
