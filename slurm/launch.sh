#!/usr/bin/env bash
# The one launch helper behind slurm/stage1.sh, slurm/cache.sh and slurm/stage2.sh.
#
#   launch.sh batch train CONFIG.yaml [--set key=value ...]       (from stage1.sh / stage2.sh)
#   launch.sh batch cache ENCODER SHARDS [OUT] [cache build args]  (from cache.sh)
#   launch.sh batch selftest [--out DIR] [--shards DIR]            (from selftest.sh)
#   launch.sh node  ...same arguments...                           (one srun task per node)
#
# `batch` runs in the sbatch script: it works out the nodes, ranks per node, master address and
# per-job log folder, writes the launch plan, starts one srun task per node and handles preemption.
# `node` runs on every node: it execs torchrun for that node's ranks. Node ranks come from SLURM
# (static rendezvous), so rank = node_rank * ranks_per_node + local_rank on every launch.
#
# Preemption: the stage scripts ask for SIGUSR1 120 s before the time limit (--signal=B:USR1@120).
# On USR1 (or `scancel --signal=USR1 --batch JOB`) the batch step forwards it to the srun step;
# SLURM delivers it to every process of the step. The launchers ignore it (SIG_IGN set here is
# inherited); the trainers catch it (llmclip.preemption.PreemptionHandler), write a checkpoint at the
# end of the current step and exit with 75. The batch step then runs `scontrol requeue` and the
# job starts again, resuming from RUN/checkpoints/latest. A program without a handler (the cache
# builder) keeps working through the grace period, then the requeue stops it; its resume skips
# complete sidecars.
#
# LLMCLIP_DRY_RUN=1 prints the plan (the exact per-node command lines) and starts nothing; with the
# SLURM variables set by hand it shows any cluster shape, e.g.
#   LLMCLIP_DRY_RUN=1 SLURM_JOB_NODELIST='gpu[001-004]' SLURM_GPUS_ON_NODE=8 SLURM_JOB_ID=7 \
#     bash slurm/stage1.sh configs/stage1/llama3-8b.yaml
#
# Environment knobs: LLMCLIP_NPROC_PER_NODE (ranks per node; default: GPUs SLURM gave the node, else
# visible GPUs, else LLMCLIP_CPU_RANKS=2 CPU ranks), LLMCLIP_MASTER_PORT, LLMCLIP_VENV (default
# ROOT/.venv), LLMCLIP_PREEMPT_GRACE_S (seconds to wait for the checkpoint after USR1, default 100).
set -euo pipefail

PREEMPTED_EXIT_CODE=75 # llmclip.preemption.PREEMPTED_EXIT_CODE: "checkpoint written, run me again"

say() { echo "llmclip-slurm: $*" >&2; }
die() { say "error: $*"; exit 2; }

# ---------------------------------------------------------------------------------------- hosts
# `scontrol show hostnames` is the source of truth; the fallback only serves dry runs on machines
# without SLURM and understands the usual forms: a,b  gpu[001-004]  gpu[01-02,07]x.
expand_hostlist() {
  local list=$1 out
  if command -v scontrol >/dev/null 2>&1 && out=$(scontrol show hostnames "$list" 2>/dev/null) &&
    [ -n "$out" ] && [[ $out != Invalid* ]]; then
    echo "$out"
    return 0
  fi
  local item="" depth=0 c i
  for ((i = 0; i < ${#list}; i++)); do
    c=${list:i:1}
    case "$c" in
      "[") depth=$((depth + 1)) ;;
      "]") depth=$((depth - 1)) ;;
    esac
    if [ "$c" = "," ] && [ "$depth" = 0 ]; then
      _expand_one "$item"
      item=""
    else
      item+=$c
    fi
  done
  [ -z "$item" ] || _expand_one "$item"
}

_expand_one() {
  local re='^([^[]*)\[([^]]*)\](.*)$'
  if [[ ! $1 =~ $re ]]; then
    echo "$1"
    return
  fi
  local pre=${BASH_REMATCH[1]} body=${BASH_REMATCH[2]} post=${BASH_REMATCH[3]} part lo hi n
  local IFS=,
  for part in $body; do
    if [[ $part == *-* ]]; then
      lo=${part%-*}
      hi=${part#*-}
      for ((n = 10#$lo; n <= 10#$hi; n++)); do
        _expand_one "$(printf '%s%0*d%s' "$pre" "${#lo}" "$n" "$post")"
      done
    else
      _expand_one "$pre$part$post"
    fi
  done
}

# ---------------------------------------------------------------------------------------- setup
# Ranks per node: what SLURM allocated (SLURM_GPUS_ON_NODE, or --gpus-per-node's "[type:]N"), else
# the GPUs this node shows, else CPU ranks (tests and laptops).
ranks_per_node() {
  local n=""
  if [ -n "${LLMCLIP_NPROC_PER_NODE:-}" ]; then
    n=$LLMCLIP_NPROC_PER_NODE
  elif [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" != 0 ]; then
    n=$SLURM_GPUS_ON_NODE
  elif [ -n "${SLURM_GPUS_PER_NODE:-}" ] && [ "${SLURM_GPUS_PER_NODE##*:}" != 0 ]; then
    n=${SLURM_GPUS_PER_NODE##*:}
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    n=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    n=$(nvidia-smi -L | grep -c '^GPU')
  fi
  [ -n "$n" ] && [ "$n" != 0 ] || n=${LLMCLIP_CPU_RANKS:-2}
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "ranks per node must be a positive integer, got '$n'"
  echo "$n"
}

setup() {
  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  cd "$ROOT"
  # The venv's torchrun by full path; PATH stays as the user has it. (Putting the venv first on
  # PATH also swaps the ninja that JIT-builds DeepSpeed's CPU ops for the venv's, whose build log
  # another ninja version does not accept: every switch rebuilds the op, minutes on a CPU.)
  local venv=${LLMCLIP_VENV:-$ROOT/.venv}
  TORCHRUN=torchrun
  [ -x "$venv/bin/torchrun" ] && TORCHRUN=$venv/bin/torchrun
  [ "${LLMCLIP_DRY_RUN:-0}" != 0 ] || command -v "$TORCHRUN" >/dev/null ||
    die "torchrun not found: run 'make install' in $ROOT or set LLMCLIP_VENV"

  JOB_ID=${SLURM_JOB_ID:-0}
  JOB_NAME=${SLURM_JOB_NAME:-llmclip}
  mapfile -t HOSTS < <(expand_hostlist "${SLURM_JOB_NODELIST:-$(hostname -s)}")
  NNODES=${#HOSTS[@]}
  [ "$NNODES" -ge 1 ] || die "no hosts in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
  MASTER_ADDR=${HOSTS[0]}
  # A port per job: two jobs sharing a node do not collide; below the ephemeral range.
  MASTER_PORT=${LLMCLIP_MASTER_PORT:-$((15000 + JOB_ID % 15000))}
  NPROC=$(ranks_per_node)
  WORLD_SIZE=$((NNODES * NPROC))
  LOG_DIR=$ROOT/slurm/logs/$JOB_NAME-$JOB_ID

  # Thread and communication defaults; anything the user exported wins.
  local cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / NPROC > 0 ? cpus / NPROC : 1))}
  export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # A rank that dies makes the others fail (and the job end) instead of hanging in a collective.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export PYTHONUNBUFFERED=1
  export PYTHONFAULTHANDLER=1
  ENV_NAMES=(OMP_NUM_THREADS MKL_NUM_THREADS TOKENIZERS_PARALLELISM NCCL_DEBUG
    TORCH_NCCL_ASYNC_ERROR_HANDLING PYTHONUNBUFFERED PYTHONFAULTHANDLER)
}

# ------------------------------------------------------------------------------------- commands
# The program every rank runs, for a job kind and the user's arguments.
program() {
  local kind=$1
  shift
  case "$kind" in
    train)
      [ $# -ge 1 ] || die "usage: sbatch slurm/stage1.sh CONFIG.yaml [--set key=value ...]"
      [ -f "$1" ] || die "config file not found: $1"
      PROGRAM=(llmclip/train.py --config "$@")
      ;;
    cache)
      [ $# -ge 2 ] || die "usage: sbatch slurm/cache.sh ENCODER SHARDS [OUT] [llmclip cache build options]"
      local encoder=$1 shards=$2 out
      shift 2
      # A stage-1 run folder stands for its exported encoder.
      [ -f "$encoder/final/encoder.json" ] && encoder=${encoder%/}/final
      [ -d "$encoder" ] || die "encoder folder not found: $encoder"
      if [ $# -ge 1 ] && [[ $1 != -* ]]; then
        out=$1
        shift
      else
        local base=${shards%%:*}
        out=cache/$(basename "${base%/}")
      fi
      PROGRAM=(-m llmclip.cli cache build --encoder "$encoder" --shards "$shards" --out "$out"
        --no-progress "$@")
      ;;
    selftest)
      # One short run of each stage on every rank, then per-node speed (llmclip/selftest.py).
      PROGRAM=(-m llmclip.selftest "$@")
      ;;
    *) die "unknown job kind '$kind' (train, cache or selftest)" ;;
  esac
}

# The exact command node NODE_RANK runs (in NODE_CMD).
node_command() {
  NODE_CMD=("$TORCHRUN" --nnodes="$NNODES" --node-rank="$1" --nproc-per-node="$NPROC"
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" --max-restarts=0 "${PROGRAM[@]}")
}

plan() {
  local i env=""
  for i in "${ENV_NAMES[@]}"; do env+=" $i=${!i}"; done
  echo "job=$JOB_ID name=$JOB_NAME restart=${SLURM_RESTART_COUNT:-0} nodes=$NNODES" \
    "nproc_per_node=$NPROC world_size=$WORLD_SIZE master=$MASTER_ADDR:$MASTER_PORT"
  echo "cwd: $ROOT"
  echo "env:$env"
  for i in "${!HOSTS[@]}"; do
    node_command "$i"
    printf 'node %d %s ranks %d-%d:' "$i" "${HOSTS[i]}" $((i * NPROC)) $(((i + 1) * NPROC - 1))
    printf ' %q' "${NODE_CMD[@]}"
    printf '\n'
  done
}

# ---------------------------------------------------------------------------------------- modes
node_main() {
  setup
  program "$@"
  local rank=${SLURM_NODEID:?node mode runs inside srun}
  node_command "$rank"
  # Launchers must survive USR1 (Python's default action would kill them); ignored signals are
  # inherited, and the trainers install their own handler over it.
  trap '' USR1
  exec "${NODE_CMD[@]}"
}

batch_main() {
  setup
  program "$@"
  if [ "${LLMCLIP_DRY_RUN:-0}" != 0 ]; then
    plan
    return 0
  fi
  [ -n "${SLURM_JOB_ID:-}" ] || die "run this through sbatch (or set LLMCLIP_DRY_RUN=1)"
  mkdir -p "$LOG_DIR"
  {
    echo "# $(date -Is)"
    plan
  } | tee -a "$LOG_DIR/plan.txt" >&2
  say "node logs: $LOG_DIR/node<N>-<host>.log"

  preempted=0
  srun_pid=""
  trap on_usr1 USR1
  # One task per node with every CPU and all the memory of the job (steps get one CPU otherwise).
  srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --mem=0 \
    --output="$LOG_DIR/node%n-%N.log" --open-mode=append \
    bash "$ROOT/slurm/launch.sh" node "$@" &
  srun_pid=$!
  [ "$preempted" = 0 ] || kill -USR1 "$srun_pid" 2>/dev/null || true
  local rc=0 grace=${LLMCLIP_PREEMPT_GRACE_S:-100} deadline
  while :; do
    rc=0
    wait "$srun_pid" || rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break # srun has ended; otherwise a trap interrupted wait
    [ "$preempted" = 1 ] || continue
    # Give the ranks the grace period to checkpoint and exit; a program that ignores USR1 is
    # stopped by the requeue below.
    deadline=$((SECONDS + grace))
    while kill -0 "$srun_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
    if kill -0 "$srun_pid" 2>/dev/null; then
      say "still running $grace s after USR1: requeueing now"
      rc=$PREEMPTED_EXIT_CODE
      break
    fi
  done
  if [ "$preempted" = 1 ] && [ "$rc" != 0 ]; then
    [ "$rc" = "$PREEMPTED_EXIT_CODE" ] && say "checkpoint written after USR1 (exit $rc)" ||
      say "stopped after USR1 with exit $rc"
    say "requeueing job $SLURM_JOB_ID: it resumes from its latest complete checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  say "finished with exit code $rc"
  exit "$rc"
}

on_usr1() {
  say "USR1 received (time limit near or preemption): asking the ranks to checkpoint"
  preempted=1
  [ -z "$srun_pid" ] || kill -USR1 "$srun_pid" 2>/dev/null || true
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  mode=${1:-}
  shift || true
  case "$mode" in
    batch) batch_main "$@" ;;
    node) node_main "$@" ;;
    *) die "usage: launch.sh batch|node train|cache|selftest ARGS..." ;;
  esac
fi
