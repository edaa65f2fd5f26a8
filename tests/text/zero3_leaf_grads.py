"""Run by ``test_train.py`` under ``deepspeed --num_gpus 2``: one ZeRO-3 micro-step of a tiny
bidirectional LoRA Llama (fp32, gradient checkpointing, every weight partitioned) per fetch unit
(``none``, ``lora``, ``layer``), each rank on its own tokens; rank 0 writes every adapter's full
reduced gradient, keyed ``MODE/NAME``, to the safetensors file named by ``--out``, and the number
of leaf modules per mode to ``--out`` + ``.json``."""

from __future__ import annotations

import argparse
import json

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llmclip.ds_config import mark_zero3_leaves
from llmclip.text.attention import make_bidirectional

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def grads(mode: str, rank: int) -> tuple[dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=512)
    lm = LlamaForCausalLM(cfg)
    make_bidirectional(lm)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(lm, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    for name, p in model.named_parameters():  # B = 0 would leave every A without a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    leaves = mark_zero3_leaves(model, mode)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "zero_allow_untested_optimizer": True}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    out = {f"{mode}/{name}": safe_get_full_grad(p).detach().clone()
           for name, p in engine.module.named_parameters() if p.requires_grad}
    return out, leaves


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the launcher's
    out = p.parse_args().out
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    found, counts = {}, {}
    for mode in ("none", "lora", "layer"):
        g, counts[mode] = grads(mode, rank)
        found.update(g)
    if rank == 0:
        save_file(found, out)
        with open(out + ".json", "w", encoding="utf-8") as f:
            json.dump(counts, f)


if __name__ == "__main__":
    main()
