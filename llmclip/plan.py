"""`llmclip plan`: per-GPU memory and step time of a recipe, before asking a cluster for it.

The estimate is a sum of named terms, each printed, so a user sees *why* a recipe fits or not:

- base weights: 4-bit NF4 (0.5 B/param + one fp32 absmax per 64-block, double-quantised to ~0.127 bit)
  for the linear layers, ``dtype`` bytes for embeddings/norms; partitioned over all ranks by ZeRO-3,
  plus the largest layer gathered (x2 for prefetch) during forward/backward;
- trainable state (LoRA or full): weights + grads (``dtype``) + fp32 master + Adam m, v = 16 B/param
  (18 B/param with separate fp32 grads when not 4-bit), partitioned by ZeRO stage;
- activations per micro-batch, counted for a Llama block (values kept for backward, per layer):
  norm inputs/outputs ``4*s*b*h``, q/k/v before and after RoPE ``2*s*b*(h + 2*kv)``, attention output
  ``s*b*h``, SwiGLU gate/up/act/product ``4*s*b*I``, and without flash-attention/sdpa the scores and
  probabilities ``2*a*s^2*b``; gradient checkpointing keeps each layer's input ``s*b*h`` plus one
  layer recomputed (the same accounting as Korthikanti et al. 2022, adapted to SwiGLU and GQA);
- MNTP logits: one chunk of the chunked loss (``s*b*V`` in ``dtype`` and their fp32 softmax when
  materialised, ``--mntp-chunk-mib 0``; stage 1 only);
- a fixed runtime overhead (CUDA context, NCCL buffers, allocator fragmentation).

Step time is FLOPs / (peak x MFU): ``6*N*tokens`` for training (``8*N`` with checkpointing, one
extra forward), attention ``12*L*s^2*h`` per sequence, at a stated MFU (default 0.35).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace

from llmclip.config import ConfigError

GiB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False

    def linear_params_per_layer(self) -> int:
        head_dim = self.hidden // self.heads
        attn = self.hidden * self.hidden * 2 + 2 * self.hidden * self.kv_heads * head_dim  # q,o + k,v
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        return attn + mlp

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def total_params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.layers * self.linear_params_per_layer() + self.embedding_params() + norms

    def lora_params(self, r: int) -> int:
        """LoRA on q,k,v,o,gate,up,down: r * (in + out) per adapted matrix."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        dims = [(self.hidden, self.hidden), (self.hidden, kv), (self.hidden, kv), (self.hidden, self.hidden),
                (self.hidden, self.intermediate), (self.hidden, self.intermediate), (self.intermediate, self.hidden)]
        return self.layers * sum(r * (i + o) for i, o in dims)


# Public architectures (from their released configs).
MODELS: dict[str, ModelShape] = {
    "llama3-8b": ModelShape(4096, 32, 32, 8, 14336, 128256),
    "llama3.2-1b": ModelShape(2048, 16, 32, 8, 8192, 128256, tied_embeddings=True),
    "mistral-7b": ModelShape(4096, 32, 32, 8, 14336, 32768),
    "qwen2-7b": ModelShape(3584, 28, 28, 4, 18944, 152064),
    "smollm2-135m": ModelShape(576, 30, 9, 3, 1536, 49152, tied_embeddings=True),
}

# Dense bf16 peak TFLOP/s of common accelerators, and fp32 GEMM peak of the CPU these tests run on.
PEAK_TFLOPS = {"h200": 989.0, "h100": 989.0, "a100": 312.0, "l40s": 362.0, "cpu": 0.174}
# Memory per GPU (GiB, as the driver reports it) for the ZeRO-stage recommendation.
GPU_MEMORY_GIB = {"h200": 140.0, "h100": 79.6, "a100": 79.2, "l40s": 44.4}
FIT_FRACTION = 0.85  # the estimate is within ~10% of measured peaks; keep headroom for the rest


@dataclass
class PlanInput:
    model: str = "llama3-8b"
    """Architecture name (see MODELS) -- the shape is all the planner needs."""
    stage: int = 1
    """1 = QLoRA encoder training (MNTP/contrastive); 2 = vision tower on cached embeddings."""
    gpus: int = 8
    """GPUs per node."""
    nodes: int = 1
    """Nodes."""
    seq: int = 512
    """Tokens per sequence (stage 1)."""
    micro_batch: int = 16
    """Sequences (stage 1) or images (stage 2) per GPU per micro-step."""
    quant: str = "nf4"
    """Base-weight storage: nf4 | bf16 | fp32."""
    lora_r: int = 16
    """LoRA rank (0 = full fine-tuning)."""
    zero_stage: int = 3
    """ZeRO stage for parameters/grads/optimizer partitioning."""
    grad_ckpt: bool = True
    """Gradient checkpointing."""
    flash_attn: bool = True
    """Flash-attention (no s^2 attention matrix kept)."""
    mntp: bool = True
    """Include the MNTP head's logits (stage 1)."""
    mntp_chunk_mib: float = 32.0
    """The MNTP loss's logits chunk (stage1.mntp_chunk_mib); 0 = all positions' logits materialised."""
    keep_layers: int = 0
    """Use only the first N decoder layers (0 = all)."""
    gpu_type: str = "h200"
    """Accelerator for the step-time estimate (see PEAK_TFLOPS)."""
    mfu: float = 0.35
    """Model FLOPs utilisation assumed for the step time."""
    overhead_gib: float = 1.5
    """Fixed per-GPU runtime overhead (context, comm buffers, fragmentation)."""
    vision_params_m: float = 86.0
    """Stage 2: vision tower parameters in millions (ViT-B/16 = 86)."""
    image_size: int = 224
    """Stage 2: image side in pixels."""
    embed_dim: int = 4096
    """Stage 2: cached text embedding dim."""

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; known: {', '.join(MODELS)}", "model")
        if self.quant not in ("nf4", "bf16", "fp32"):
            raise ConfigError("must be nf4, bf16 or fp32", "quant")
        if self.gpu_type not in PEAK_TFLOPS:
            raise ConfigError(f"unknown gpu type; known: {', '.join(PEAK_TFLOPS)}", "gpu_type")
        if self.stage not in (1, 2):
            raise ConfigError("must be 1 or 2", "stage")
        for name in ("gpus", "nodes", "seq", "micro_batch"):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", name)
        if self.mntp_chunk_mib < 0:
            raise ConfigError("must be >= 0 (0 = materialised logits)", "mntp_chunk_mib")
        if not 0 < self.mfu <= 1:
            raise ConfigError("must be in (0, 1]", "mfu")
        if self.quant == "nf4" and self.lora_r == 0:
            raise ConfigError("4-bit base weights cannot be fully fine-tuned; set lora_r > 0", "lora_r")


def _bytes_per_param(quant: str) -> float:
    # NF4: 4 bits + an 8-bit absmax per 64-block (double quantisation) + an fp32 scale per 256 blocks.
    return {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "bf16": 2.0, "fp32": 4.0}[quant]


def plan_stage1(p: PlanInput) -> dict[str, float]:
    shape = MODELS[p.model]
    layers = p.keep_layers or shape.layers
    ranks = p.gpus * p.nodes
    dtype_b = 4.0 if p.quant == "fp32" else 2.0
    lin = layers * shape.linear_params_per_layer()
    emb = shape.embedding_params() if p.mntp else shape.vocab * shape.hidden
    shard = ranks if p.zero_stage == 3 else 1
    # Full fine-tuning counts the weights once, in the trainable states below.
    base = (lin * _bytes_per_param(p.quant) + emb * dtype_b) / shard if p.lora_r else 0.0
    gathered = 2 * shape.linear_params_per_layer() * _bytes_per_param(p.quant) if p.zero_stage == 3 else 0.0
    trainable = shape.lora_params(p.lora_r) * layers // shape.layers if p.lora_r else lin + emb
    # fp32: weights, grads, Adam m, v. Mixed precision: DeepSpeed's accounting of 18 B/param (16-bit
    # weights and grads, fp32 master, m, v, and fp32 gradient buffers), as in its ZeRO-3 estimator.
    per_param = 4 + 4 + 8 if p.quant == "fp32" else 18
    opt_shard = ranks if p.zero_stage >= 1 else 1
    grad_shard = ranks if p.zero_stage >= 2 else 1
    # Below ZeRO-3 the 16-bit weights stay whole on every rank; ZeRO-2 partitions the gradients,
    # ZeRO-1 and -2 the fp32 master and Adam states.
    states = (trainable * dtype_b + trainable * dtype_b / grad_shard
              + trainable * (per_param - 2 * dtype_b) / opt_shard)
    if p.zero_stage == 3:
        states = trainable * per_param / ranks
    s, b, h, a = p.seq, p.micro_batch, shape.hidden, shape.heads
    kv = shape.kv_heads * (h // a)
    values = s * b * (4 * h + 2 * (h + 2 * kv) + h + 4 * shape.intermediate)
    values += 0 if p.flash_attn else 2 * a * s * s * b
    per_layer_full = values * dtype_b
    acts = layers * s * b * h * dtype_b + per_layer_full if p.grad_ckpt else layers * per_layer_full
    if p.lora_r:
        # Each adapted projection's LoRA branch output, measured two ways. On CUDA (8B QLoRA with
        # checkpointing on an H200, benchmarks/results/gpu-check-2026-11-29-nvidia-h200-stage1.json:
        # 11.6 GiB, this plan 13.5) only the recomputed layer holds them. On CPU the peak RSS
        # (tests/core/test_plan.py) grows by them in every layer, checkpointed or not (most likely
        # the C heap keeping what each recomputation frees).
        out_dims = 2 * h + 2 * kv + 2 * shape.intermediate + h
        every_layer = not p.grad_ckpt or p.gpu_type == "cpu"
        acts += (layers if every_layer else 1) * s * b * out_dims * dtype_b
    # Materialised, an LM-head loss keeps logits, a shifted copy, fp32 log-probs and their gradient
    # (4 copies over every position). Chunked (llmclip's MNTP loss), one chunk of fp32 logits and its
    # 16-bit matmul output exist at a time, plus the gradient of the blanked rows' states.
    if not p.mntp:
        logits = 0.0
    elif p.mntp_chunk_mib > 0:
        logits = p.mntp_chunk_mib * 2**20 * (1 + dtype_b / 4) + 0.2 * s * b * h * 4
    else:
        logits = s * b * shape.vocab * max(dtype_b, 4) * 4
    terms = {
        "base_weights_gib": (base + gathered) / GiB,
        "trainable_states_gib": states / GiB,
        "activations_gib": acts / GiB,
        "mntp_logits_gib": logits / GiB,
        "overhead_gib": p.overhead_gib,
    }
    terms["total_gib"] = sum(terms.values())
    # ZeRO-3 Init cannot partition a 4-bit model while loading: each rank holds it whole once.
    terms["load_peak_gib"] = (lin * _bytes_per_param(p.quant) + emb * dtype_b) / GiB + p.overhead_gib
    n = layers * shape.linear_params_per_layer()
    flops_per_token = (8 if p.grad_ckpt else 6) * n + 12 * layers * s * h
    tokens = s * b * ranks
    terms["trainable_params_m"] = trainable / 1e6
    terms["step_time_s"] = flops_per_token * tokens / ranks / (PEAK_TFLOPS[p.gpu_type] * 1e12 * p.mfu)
    terms["tokens_per_s_per_gpu"] = s * b / terms["step_time_s"]
    return terms


def plan_stage2(p: PlanInput) -> dict[str, float]:
    ranks = p.gpus * p.nodes
    n = p.vision_params_m * 1e6 + p.embed_dim * 1024  # tower + text adapter
    states = n * 16 / (ranks if p.zero_stage >= 2 else 1)
    patches = (p.image_size // 16) ** 2 + 1
    width, depth = 768, 12  # ViT-B geometry: the activation term scales with it
    acts = p.micro_batch * patches * width * 34 * depth * (0.1 if p.grad_ckpt else 1.0)
    terms = {
        "base_weights_gib": 0.0,
        "trainable_states_gib": states / GiB,
        "activations_gib": acts / GiB,
        "mntp_logits_gib": 0.0,
        "overhead_gib": p.overhead_gib,
    }
    terms["total_gib"] = sum(terms.values())
    flops = 6 * p.vision_params_m * 1e6 * patches * p.micro_batch
    terms["trainable_params_m"] = n / 1e6
    terms["step_time_s"] = flops / (PEAK_TFLOPS[p.gpu_type] * 1e12 * p.mfu)
    terms["tokens_per_s_per_gpu"] = p.micro_batch / terms["step_time_s"]
    return terms


def plan(p: PlanInput) -> dict[str, float]:
    p.validate()
    return plan_stage1(p) if p.stage == 1 else plan_stage2(p)


def recommend_zero_stage(p: PlanInput) -> tuple[int | None, str]:
    """The ZeRO stage to run ``p`` with on its GPU type: 2 where the recipe fits under it, else 3.

    ZeRO-2 keeps the (4-bit) base whole on every GPU and partitions only the trainable states, so a
    step is the model's own forward and backward. ZeRO-3 partitions the base too, and its per-module
    gather/release hooks cost host time on every forward, recompute and backward: on one H200 the
    8B QLoRA step at 12K tokens per micro-step ran at 30.5% MFU under ZeRO-3 and 56.8% under ZeRO-2
    (``benchmarks/results/gpu-check-2026-12-04-nvidia-h200-s1-mb8-z*-profile.json``); at 49K tokens
    the GPU hides the hooks (59.1% vs 59.6%). ZeRO-3 is for what does not fit: full fine-tuning, or a
    model whose 4-bit base and activations exceed one GPU. ``(None, reason)`` on the CPU."""
    mem = GPU_MEMORY_GIB.get(p.gpu_type)
    if mem is None:
        return None, f"no GPU memory known for {p.gpu_type!r} (CPU recipes: ZeRO-2 on one node)"
    budget = FIT_FRACTION * mem
    zero2 = plan(replace(p, zero_stage=2))["total_gib"]
    if zero2 <= budget:
        return 2, f"fits under ZeRO-2: {zero2:.1f} of {budget:.0f} GiB ({FIT_FRACTION:.0%} of {mem:.0f})"
    zero3 = plan(replace(p, zero_stage=3))["total_gib"]
    verdict = "fits" if zero3 <= budget else "does NOT fit: fewer tokens per micro-step, or more GPUs"
    return 3, (f"ZeRO-2 needs {zero2:.1f} GiB of {budget:.0f}; ZeRO-3 {zero3:.1f} GiB {verdict}")


def deepspeed_zero3_states_gib(p: PlanInput) -> float:
    """DeepSpeed's own ZeRO-3 model-state estimate (no offload) for full fine-tuning, for comparison."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = MODELS[p.model]
    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        shape.total_params(), shape.linear_params_per_layer(), p.gpus, p.nodes, cpu_offload=False)
    return gpu / GiB


def _cmd_plan(args: argparse.Namespace) -> int:
    p = PlanInput(model=args.model, stage=args.stage, gpus=args.gpus, nodes=args.nodes, seq=args.seq,
                  micro_batch=args.micro_batch, quant=args.quant, lora_r=args.lora_r,
                  zero_stage=args.zero_stage, grad_ckpt=not args.no_grad_ckpt,
                  flash_attn=not args.no_flash_attn, gpu_type=args.gpu_type, mfu=args.mfu,
                  mntp_chunk_mib=args.mntp_chunk_mib)
    terms = plan(p)
    if args.json:
        stage, why = recommend_zero_stage(p)
        print(json.dumps({"input": asdict(p), "estimate": terms,
                          "recommended_zero_stage": stage, "why": why}, indent=2))
        return 0
    print(f"llmclip plan: {p.model} stage {p.stage}, {p.nodes} node(s) x {p.gpus} GPU(s), "
          f"seq {p.seq}, micro-batch {p.micro_batch}, {p.quant}, LoRA r={p.lora_r}, ZeRO-{p.zero_stage}")
    for k, v in terms.items():
        print(f"  {k:24s} {v:12.3f}")
    if p.stage == 1 and p.lora_r == 0 and p.zero_stage == 3:
        print(f"  deepspeed zero3 states   {deepspeed_zero3_states_gib(p):12.3f}  (DeepSpeed's estimator)")
    stage, why = recommend_zero_stage(p)
    if stage is not None:
        print(f"recommended ZeRO stage: {stage} ({why})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    d = PlanInput()
    p = sub.add_parser("plan", help="per-GPU memory and step-time estimate of a recipe")
    p.add_argument("--model", default=d.model, choices=sorted(MODELS))
    p.add_argument("--stage", type=int, default=d.stage, choices=(1, 2))
    p.add_argument("--gpus", type=int, default=d.gpus)
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--seq", type=int, default=d.seq)
    p.add_argument("--micro-batch", type=int, default=d.micro_batch)
    p.add_argument("--quant", default=d.quant, choices=("nf4", "bf16", "fp32"))
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--zero-stage", type=int, default=d.zero_stage, choices=(0, 1, 2, 3))
    p.add_argument("--no-grad-ckpt", action="store_true")
    p.add_argument("--no-flash-attn", action="store_true")
    p.add_argument("--gpu-type", default=d.gpu_type, choices=sorted(PEAK_TFLOPS))
    p.add_argument("--mfu", type=float, default=d.mfu)
    p.add_argument("--mntp-chunk-mib", type=float, default=d.mntp_chunk_mib,
                   help="MNTP cross-entropy chunk (0 = logits materialised over every position)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=_cmd_plan)
