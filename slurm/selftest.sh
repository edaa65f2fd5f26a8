#!/bin/bash
# Cluster self-test: one short run of each stage (stage 1, the embedding cache, stage 2) on every
# rank of every node, then one line per node with its speed. Run from the repository root:
#   sbatch --nodes=2 slurm/selftest.sh                   (GPU nodes: the #SBATCH defaults below)
#   sbatch --nodes=2 --gpus-per-node=0 slurm/selftest.sh (CPU nodes: 2 CPU ranks each)
#   sbatch slurm/selftest.sh --out runs/selftest --shards shards/openi   (own data / folder)
# The table and "selftest: OK" are in slurm/logs/llmclip-selftest-JOBID/node0-*.log; a failure
# ends the job non-zero ("selftest: FAILED on node N ...").
# LLMCLIP_DRY_RUN=1 prints the per-node command lines instead of running them.
#SBATCH --job-name=llmclip-selftest
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=00:30:00
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file from its spool folder: find the checkout from where it was submitted.
here=$(dirname "$0")
[ -f "$here/launch.sh" ] && root="$here/.." || root=${LLMCLIP_ROOT:-${SLURM_SUBMIT_DIR:-.}}
[ -f "$root/slurm/launch.sh" ] || { echo "run sbatch from the llmclip checkout (or set LLMCLIP_ROOT)" >&2; exit 2; }
exec bash "$root/slurm/launch.sh" batch selftest "$@"
