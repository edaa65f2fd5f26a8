"""Checks 3 and 4 of ``gpu_check.py``: timed training steps at full size.

3. stage 1: QLoRA contrastive steps of a randomly initialised llama3-8b-shaped model (NF4 + LoRA r16,
   gradient checkpointing, Liger, the best attention available, DeepSpeed ZeRO-3): tokens/s, MFU
   against the target, peak memory next to ``llmclip plan``'s estimate for the same recipe;
4. stage 2: ViT-B/16 steps at 224 px on cached 4096-d embeddings (ZeRO-2, bf16): images/s.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402, F401
import torch  # noqa: E402

GiB = 1024**3
MFU_TARGET = 0.40  # stage-1 QLoRA step on one GPU (issue #16); reported as met / not met
Env = Any  # gpu_check.Env (device, dtype, sizes); typed loosely to avoid an import cycle


def timed(env: Env, fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        env.sync()
        t0 = time.perf_counter()
        fn()
        env.sync()
        out.append(time.perf_counter() - t0)
    return out



def profile_step(env: Env, fn) -> dict[str, Any]:
    """One more step under the PyTorch profiler: wall time, the GPU's busy time (sum of kernel
    times) and the kernels that take it, so a low MFU can be told apart into launch/host overhead
    (busy << wall) and slow kernels (which ones)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
    env.sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        env.sync()
    wall = time.perf_counter() - t0
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy_us = sum(e.device_time_total for e in events)  # kernels on side streams may overlap
    table: dict[str, list[float]] = {}
    for e in events:
        row = table.setdefault(e.name[:120], [0.0, 0])
        row[0] += e.device_time_total
        row[1] += 1
    top = sorted(table.items(), key=lambda kv: -kv[1][0])[:25]
    # Host side: where the CPU thread spends its own time (ops, hooks, runtime calls), and how long
    # it sat in calls that wait for the GPU (a sync in the step serialises host and device).
    ops = prof.key_averages()
    host = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:25]
    waits = sum(e.self_cpu_time_total for e in ops
                if "Synchronize" in e.key or e.key.startswith("cudaMemcpy"))
    return {"wall_s": wall, "gpu_busy_s": busy_us / 1e6, "kernel_launches": len(events),
            "top_kernels": [{"name": k, "ms": v[0] / 1e3, "calls": v[1]} for k, v in top],
            "host_wait_for_gpu_s": waits / 1e6,
            "top_host_ops": [{"name": e.key[:120], "self_ms": e.self_cpu_time_total / 1e3,
                              "calls": e.count} for e in host]}


# ------------------------------------------------------------------------------------------------
# 3. stage 1 QLoRA
# ------------------------------------------------------------------------------------------------


def random_llama_dir(env: Env, work: Path) -> tuple[Path, str]:
    """A randomly initialised llama3-8b-shaped checkpoint (smoke: a tiny shape) + a real tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmclip.plan import MODELS
    from llmclip.text.sources import smollm2_tokenizer_dir

    name = "smoke-tiny" if env.smoke else "llama3-8b"
    shape = MODELS["llama3-8b"]
    if env.smoke:
        from llmclip.plan import ModelShape

        shape = ModelShape(128, 2, 4, 2, 256, 49152, tied_embeddings=True)
        MODELS[name] = shape  # so the planner can be asked about the same shape
    out = work / f"random-{name}"
    if (out / "config.json").is_file():  # a --workdir reused by a later run
        return out, name
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied_embeddings,
        max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(env.device):
        model = LlamaForCausalLM(config).to(env.dtype)
    tmp = work / f".random-{name}.tmp"
    model.save_pretrained(tmp, max_shard_size="5GB")
    tok.save_pretrained(tmp)
    del model
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    os.replace(tmp, out)
    return out, name


def build_stage1(env: Env, work: Path, leaf: str) -> dict[str, Any]:
    """The stage-1 engine of check 3 with ``leaf`` as its ZeRO-3 fetch unit, and its ``step``."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from llmclip.config import DeepSpeedSection, OptimConfig, RunConfig, lr_factor
    from llmclip.ds_config import mark_zero3_leaves
    from llmclip.text.kernels import attention_backends
    from llmclip.text.model_config import LoraSection, ModelConfig
    from llmclip.text.stage1 import Stage1Module, deepspeed_config, param_groups
    from llmclip.text.stage1_config import ObjectiveConfig, Stage1Config

    a = env.args
    b, seq = (2, 32) if env.smoke else (a.s1_micro_batch, a.s1_seq)
    t0 = time.perf_counter()
    folder, model_name = random_llama_dir(env, work)
    build_s = time.perf_counter() - t0
    ds_json = {(3, True): "cpu_zero3.json", (3, False): "zero3_qlora.json",
               (2, True): "cpu_zero2.json", (2, False): "zero2_bf16.json"}[a.s1_zero, env.smoke]
    cfg = Stage1Config(
        run=RunConfig(out_dir=str(work / "stage1-run"), tensorboard=False),
        model=ModelConfig(
            source=str(folder), quantization="nf4", attention="auto", kernels="auto",
            max_length=seq, gradient_checkpointing=True, pooling="mean", lora=LoraSection(r=16, alpha=32),
        ),
        stage1=ObjectiveConfig(contrastive_scale=50.0, hard_negatives=1),
        optim=OptimConfig(lr=1e-4, warmup_steps=0, max_steps=1000),
        deepspeed=DeepSpeedSection(config=str(C.REPO / "ds_configs" / ds_json),
                                   micro_batch_size=b, precision="bf16" if not env.smoke else "fp32"),
    )  # fmt: skip
    C.single_rank_env()
    ds_config = deepspeed_config(cfg, 1)
    zero_opts = json.loads(a.s1_zero_opts) if a.s1_zero_opts else {}
    ds_config["zero_optimization"].update(zero_opts)
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (alive while loading, as stage1.run does)
    env.reset_peak()
    t0 = time.perf_counter()
    from llmclip.text.encoder import LLMEncoder

    enc = LLMEncoder.build(cfg.model, torch.bfloat16 if not env.smoke else torch.float32)
    module = Stage1Module(enc, cfg.stage1)
    leaves = mark_zero3_leaves(module, leaf, ds_config) if a.s1_zero == 3 else 0
    opt = torch.optim.AdamW(param_groups(module, cfg.optim.weight_decay), lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.optim))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=opt, lr_scheduler=sched, config=ds_config
    )
    del hf_ds
    unset_hf_deepspeed_config()
    load_s = time.perf_counter() - t0
    load_peak = env.peak_gib()
    vocab = min(len(enc.tokenizer), enc.base_model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)

    def ids(rows: int) -> torch.Tensor:
        return torch.randint(3, vocab, (rows, seq), generator=gen).to(engine.device)

    def bucket(rows: int) -> dict[str, Any]:
        """One full-length bucket in ``LLMEncoder.tokenize_buckets``' format (no padding)."""
        ones = torch.ones(rows, seq, dtype=torch.long, device=engine.device)
        return {"input_ids": [ids(rows)], "attention_mask": [ones], "pool_mask": [ones],
                "inverse": torch.arange(rows, device=engine.device)}  # fmt: skip

    batch = {
        "kind": "contrastive", "texts": bucket(3 * b), "queries": b,
        "neg_valid": torch.ones(b, dtype=torch.bool, device=engine.device),
        "neg_rows": torch.ones(b, dtype=torch.bool, device=engine.device),
        "pos_ids": torch.arange(b, device=engine.device),
        "neg_ids": torch.arange(b, 2 * b, device=engine.device),
    }  # fmt: skip
    losses: list[float] = []
    # from_pretrained returns the model in eval mode, and transformers only checkpoints in training
    # mode: without this the step keeps every layer's activations (102 GiB vs 11.6 on an H200).
    engine.train()

    def step() -> None:
        # Fused SDPA kernels only (flash, else memory-efficient; no math fallback), forward and the
        # checkpointed recomputation in backward alike; a no-op on the CPU and for flash-attn.
        with attention_backends(engine.device):
            out = engine(**batch)
            engine.backward(out["loss"])
        engine.step()
        losses.append(float(out["loss"].detach()))

    return {"module": module, "enc": enc, "step": step, "losses": losses,
            "leaves": leaves, "b": b, "seq": seq, "model_name": model_name, "ds_json": ds_json,
            "zero_opts": zero_opts, "build_s": build_s, "load_s": load_s, "load_peak": load_peak}


def stage1_mfu(env: Env, model_name: str, b: int, seq: int, step_s: float) -> float:
    """MFU of one stage-1 step of 3 x ``b`` sequences of ``seq`` tokens, ``llmclip plan``'s count."""
    from llmclip.plan import MODELS, PEAK_TFLOPS

    shape = MODELS[model_name]
    n_lin = shape.layers * shape.linear_params_per_layer()
    flops = (8 * n_lin + 12 * shape.layers * seq * shape.hidden) * 3 * b * seq
    return flops / step_s / (PEAK_TFLOPS[env.gpu_type()] * 1e12)


def check_stage1(env: Env, work: Path) -> dict[str, Any]:
    from llmclip.plan import MODELS, PEAK_TFLOPS, PlanInput, plan
    from llmclip.text.kernels import kernels_of, liger_status

    a = env.args
    s1 = build_stage1(env, work, a.s1_zero3_leaf)
    module, enc, step, losses = s1["module"], s1["enc"], s1["step"], s1["losses"]
    b, seq, model_name, leaves = s1["b"], s1["seq"], s1["model_name"], s1["leaves"]
    ds_json, zero_opts, build_s, load_s, load_peak = (
        s1["ds_json"], s1["zero_opts"], s1["build_s"], s1["load_s"], s1["load_peak"])
    attn_impl = enc.base_model.config._attn_implementation
    kernels = kernels_of(enc.base_model)
    env.reset_peak()
    times = timed(env, step, steps=2 if env.smoke else a.s1_steps, warmup=1 if env.smoke else 2)
    step_s = C.median(times)
    profile = profile_step(env, step) if a.s1_profile else None
    tokens = 3 * b * seq
    gpu_type = env.gpu_type()
    est = plan(PlanInput(model=model_name, stage=1, gpus=1, nodes=1, seq=seq, micro_batch=3 * b,
                         quant="nf4", lora_r=16, zero_stage=a.s1_zero, grad_ckpt=True,
                         flash_attn=attn_impl == "flash_attention_2", mntp=False,
                         gpu_type=gpu_type))  # fmt: skip
    shape = MODELS[model_name]
    peak_tflops = PEAK_TFLOPS[gpu_type]
    mfu = stage1_mfu(env, model_name, b, seq, step_s)
    peak = env.peak_gib()
    met = "met" if mfu >= MFU_TARGET else "NOT met"
    finite = all(map(lambda x: x == x and abs(x) != float("inf"), losses))
    liger_expected = liger_status()[0]
    print(f"gpu_check: stage1 MFU {mfu:.1%} (target >= {MFU_TARGET:.0%}: {met}); attention "
          f"{attn_impl}, kernels {kernels.get('kernels')} {kernels.get('applied') or kernels.get('reason')}; "
          f"peak memory "
          f"{peak:.1f} GiB vs llmclip plan {est['total_gib']:.1f} GiB (x{peak / est['total_gib']:.2f})",
          flush=True)  # fmt: skip
    if profile:
        print(f"gpu_check: stage1 profiled step {profile['wall_s']:.2f} s, GPU busy "
              f"{profile['gpu_busy_s']:.2f} s in {profile['kernel_launches']} kernels; top: "
              + "; ".join(f"{k['name'][:60]} {k['ms']:.0f} ms" for k in profile["top_kernels"][:6]),
              flush=True)  # fmt: skip
        print(f"gpu_check: stage1 host waits for the GPU {profile['host_wait_for_gpu_s']:.2f} s; top "
              "host ops: " + "; ".join(f"{k['name'][:50]} {k['self_ms']:.0f} ms x{k['calls']}"
                                       for k in profile["top_host_ops"][:10]), flush=True)
    return {
        "model": model_name, "params_b": shape.total_params() / 1e9,
        # ZeRO-3 leaves partitioned parameters empty; ds_numel is their real size.
        "trainable_m": sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()
                           if p.requires_grad) / 1e6,
        "zero_stage": a.s1_zero, "ds_config": ds_json, "zero_overrides": zero_opts,
        "zero3_leaf": a.s1_zero3_leaf if a.s1_zero == 3 else "n/a", "zero3_leaf_modules": leaves,
        "profile": profile,
        "attention": attn_impl, "kernels": kernels, "micro_batch_triples": b, "seq": seq, "tokens_per_step": tokens,
        "checkpoint_build_s": build_s, "load_s": load_s, "load_peak_gib": load_peak,
        "step_s_median": step_s, "step_s": times, "tokens_per_s": tokens / step_s,
        "mfu": mfu, "mfu_target": MFU_TARGET, "mfu_target_met": mfu >= MFU_TARGET,
        "mfu_flops": "llmclip plan's count: (8 N + 12 L s h) per token with checkpointing",
        "peak_tflops_assumed": peak_tflops,
        "peak_mem_gib": peak, "loss_first_last": [losses[0], losses[-1]],
        "finite": finite, "liger_expected": liger_expected,
        # correctness only (MFU is a target, reported above): finite losses, Liger on where usable
        "ok": finite and (bool(kernels.get("applied")) or not liger_expected),
        "plan": {k: est[k] for k in ("total_gib", "load_peak_gib", "step_time_s",
                                     "tokens_per_s_per_gpu", "activations_gib",
                                     "trainable_params_m")},
        "plan_memory_ratio": peak / est["total_gib"],
        "plan_step_time_ratio": step_s / est["step_time_s"],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------
# 4. stage 2 ViT-B/16
# ------------------------------------------------------------------------------------------------


def check_stage2(env: Env, work: Path) -> dict[str, Any]:
    import deepspeed

    from llmclip.clip.losses import total_loss
    from llmclip.clip.model import CLIPModel, ModelConfig, VisionConfig
    from llmclip.clip.stage2 import (
        Stage2Config,
        Stage2OptimConfig,
        build_ds_config,
        lr_factor,
        param_groups,
    )
    from llmclip.config import DeepSpeedSection, RunConfig
    from llmclip.plan import PEAK_TFLOPS, PlanInput, plan

    a = env.args
    if env.smoke:
        vision, size, b, text_dim, ds_json = "vit_tiny_patch16_224", 32, 8, 64, "cpu_zero2.json"
    else:
        vision, size, b, text_dim, ds_json = (
            "vit_base_patch16_224",
            224,
            a.s2_batch,
            4096,
            "zero2_bf16.json",
        )
    cfg = Stage2Config(
        run=RunConfig(out_dir=str(work / "stage2-run"), tensorboard=False),
        model=ModelConfig(vision=VisionConfig(name=vision), embed_dim=512),
        optim=Stage2OptimConfig(lr=5e-4, weight_decay=0.2, warmup_steps=0, max_steps=1000),
        deepspeed=DeepSpeedSection(config=str(C.REPO / "ds_configs" / ds_json), micro_batch_size=b,
                                   precision="fp32" if env.smoke else "bf16"),
    )  # fmt: skip
    C.single_rank_env()
    torch.manual_seed(0)
    env.reset_peak()
    model = CLIPModel(cfg.model, text_dim, size)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.optim))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=build_ds_config(cfg, 1)
    )
    dev = engine.device
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen).to(dev)
    text = torch.randn(b, text_dim, generator=gen).to(dev).to(torch.float16)
    labels = torch.zeros(b, 14, device=dev)
    losses = []

    def step() -> None:
        pixels = model.preprocess(images)
        feats = engine(pixels, text)
        loss, _ = total_loss(cfg.loss, feats, {"text_raw": text, "labels": labels})
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))

    times = timed(env, step, steps=2 if env.smoke else a.s2_steps, warmup=1 if env.smoke else 3)
    step_s = C.median(times)
    n_vis = sum(p.numel() for p in model.visual.parameters())
    patches = (size // 16) ** 2 + 1
    gpu_type = env.gpu_type()
    est = plan(PlanInput(stage=2, gpus=1, nodes=1, micro_batch=b, zero_stage=2, grad_ckpt=False,
                         vision_params_m=n_vis / 1e6, image_size=size, embed_dim=text_dim,
                         gpu_type=gpu_type))  # fmt: skip
    return {
        "vision": vision, "image_size": size, "batch": b, "text_dim": text_dim,
        "vision_params_m": n_vis / 1e6, "step_s_median": step_s, "step_s": times,
        "images_per_s": b / step_s, "peak_mem_gib": env.peak_gib(),
        "mfu": 6 * n_vis * patches * b / step_s / (PEAK_TFLOPS[gpu_type] * 1e12),
        "loss_first_last": [losses[0], losses[-1]],
        "plan": {k: est[k] for k in ("total_gib", "step_time_s", "tokens_per_s_per_gpu")},
        "plan_memory_ratio": env.peak_gib() / est["total_gib"],
    }  # fmt: skip
