#!/bin/bash
# Embedding cache: encode every report once with a finished stage-1 encoder. From the repo root:
#   sbatch slurm/cache.sh ENCODER SHARDS [OUT] [llmclip cache build options]
#   sbatch slurm/cache.sh runs/stage1/llama3-8b shards/mimic            (OUT: cache/mimic)
#   sbatch slurm/cache.sh runs/stage1/llama3-8b shards/mimic cache/mimic --variants report,negated,laterality,severity
# ENCODER is a stage-1 run folder (its final/ is used) or an encoder folder. Each rank encodes whole
# shards (index mod world size) into sidecars; near the time limit the job requeues itself and the
# rerun skips complete sidecars. LLMCLIP_DRY_RUN=1 prints the per-node command lines.
#SBATCH --job-name=llmclip-cache
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file from its spool folder: find the checkout from where it was submitted.
here=$(dirname "$0")
[ -f "$here/launch.sh" ] && root="$here/.." || root=${LLMCLIP_ROOT:-${SLURM_SUBMIT_DIR:-.}}
[ -f "$root/slurm/launch.sh" ] || { echo "run sbatch from the llmclip checkout (or set LLMCLIP_ROOT)" >&2; exit 2; }
exec bash "$root/slurm/launch.sh" batch cache "$@"
