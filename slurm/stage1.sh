#!/bin/bash
# Stage 1 (LLM -> report encoder) on SLURM. Run from the repository root:
#   sbatch slurm/stage1.sh configs/stage1/llama3-8b.yaml [--set optim.lr=1e-4 ...]
#   sbatch --nodes=4 --time=48:00:00 slurm/stage1.sh ...     (any #SBATCH default below)
# One srun task per node starts that node's ranks with torchrun (slurm/launch.sh). Near the time
# limit the job checkpoints, requeues itself and resumes from RUN/checkpoints/latest.
# LLMCLIP_DRY_RUN=1 prints the per-node command lines instead of running them.
#SBATCH --job-name=llmclip-stage1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file from its spool folder: find the checkout from where it was submitted.
here=$(dirname "$0")
[ -f "$here/launch.sh" ] && root="$here/.." || root=${LLMCLIP_ROOT:-${SLURM_SUBMIT_DIR:-.}}
[ -f "$root/slurm/launch.sh" ] || { echo "run sbatch from the llmclip checkout (or set LLMCLIP_ROOT)" >&2; exit 2; }
exec bash "$root/slurm/launch.sh" batch train "$@"
