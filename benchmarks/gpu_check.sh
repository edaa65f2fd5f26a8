#!/usr/bin/env bash
# One prepared GPU check for one H200 (or any CUDA GPU), under 10 minutes (9-minute limit), one JSON:
#   1. attention: eager vs SDPA forced to its math / flash / memory-efficient kernel vs
#      flash_attention_2 (when flash-attn is installed), bidirectional hidden states, bf16; each
#      implementation is bidirectional and masks padding; a causal-vs-bidirectional control;
#   2. kernels: Liger RMSNorm + SwiGLU + RoPE patched model vs plain (fp32, bf16, NF4 + LoRA: hidden
#      states, loss, gradients); Liger fused linear cross-entropy and the chunked MNTP loss vs
#      F.cross_entropy. Every pair is passed / failed / skipped (reason), never a silent pass;
#   3. stage-1 QLoRA contrastive steps of a randomly initialised llama3-8b-shaped model
#      (NF4 + LoRA r16 + gradient checkpointing + Liger + fused SDPA, DeepSpeed ZeRO-3): tokens/s,
#      MFU against the 40% target, peak memory next to `llmclip plan`'s estimate for the same recipe;
#   4. stage-2 steps of ViT-B/16 at 224 px on cached 4096-d embeddings (ZeRO-2 bf16): images/s.
#   5. (only with --checks ...,fetch) check 3's ZeRO-3 step once per fetch unit (--fetch-units
#      layer,lora[,none]), timed interleaved in one process: each unit's MFU on the same machine.
# Output: benchmarks/results/gpu-check-<date>-<gpu>.json (commit it with the date and GPU name).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repo root
#   bash benchmarks/gpu_check.sh --cpu-smoke     # the same Python on tiny sizes, on a CPU
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh --checks attention,stage2
#   bash benchmarks/gpu_check.sh --checks fetch --fetch-units layer,lora,none
#
# Needs the project installed in .venv (`make install`; liger-kernel via `pip install -e '.[gpu]'`,
# flash-attn via `pip install flash-attn --no-build-isolation`; a missing one is reported as skipped,
# not passed),
# ~20 GB free disk for the random 8B checkpoint (in $TMPDIR or --workdir), and no network.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-540}"

if [[ ! -x "$PY" ]]; then
  echo "gpu_check: no Python at $PY; run 'make install' first or set PYTHON=" >&2
  exit 2
fi

if [[ " $* " == *" --cpu-smoke "* ]]; then
  export DS_ACCELERATOR=cpu  # DeepSpeed on the CPU even where a GPU is present
  exec timeout "$LIMIT_S" "$PY" benchmarks/gpu_check.py "$@"
fi

# Fail fast and clearly, before minutes of model building, when there is no usable GPU.
if ! "$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch " + torch.__version__ + " sees no CUDA device "
             "(no GPU, no driver, or a CPU-only torch build); use --cpu-smoke to test the script")
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
if p.total_memory < 60 * 2**30:
    print("gpu_check: warning: < 60 GiB of GPU memory; the 8B QLoRA check may not fit")
EOF
then
  exit 3
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)
status=0
timeout "$LIMIT_S" "$PY" benchmarks/gpu_check.py "$@" || status=$?
echo "gpu_check: finished in $(( $(date +%s) - start )) s with status $status"
if [[ $status -eq 124 ]]; then
  echo "gpu_check: hit the ${LIMIT_S}s limit (set GPU_CHECK_LIMIT_S, or --checks to run fewer)" >&2
fi
exit $status
