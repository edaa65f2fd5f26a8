"""The encoder dir (``RUN/final/``): what stage 1 hands to the cache builder.

    encoder.json        format, pooling, max_length, instruction(s), dim, dtype, base model, fingerprint
    model/              the decoder with LoRA merged, safetensors, config marked non-causal (AutoModel)
    tokenizer/          the tokenizer
    pooler.safetensors  trainable pooler weights (latent_attention only)
    adapter/            the LoRA adapter alone (peft format), when the run used LoRA

The fingerprint is a sha256 over every weight file's bytes plus pooling, max length and instruction:
two dirs with the same fingerprint embed every report identically, so the cache builder can record it
and stage 2 can refuse embeddings made by another encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn

from llmclip.text.encoder import ENCODER_FORMAT


def compute_fingerprint(enc_dir: Path, meta: dict[str, Any]) -> str:
    """sha256 over weight files (sorted by relative path) and the settings that change embeddings."""
    h = hashlib.sha256()
    files = sorted(p for p in (enc_dir / meta.get("model_dir", "model")).rglob("*.safetensors"))
    if meta.get("pooler_file"):
        files.append(enc_dir / meta["pooler_file"])
    for f in files:
        h.update(str(f.relative_to(enc_dir)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    settings = {k: meta.get(k) for k in ("pooling", "max_length", "instruction", "pooler_args")}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def save_encoder_dir(out: str | Path, decoder: nn.Module, tokenizer: Any, pooler: nn.Module, *,
                     pooling: str, max_length: int, dtype: str, instruction: str | None = None,
                     instructions: dict[str, str] | None = None, pooler_args: dict[str, Any] | None = None,
                     adapter_dir: Path | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write an encoder dir atomically (temp folder, then rename) and return its path.

    ``decoder`` is a plain transformers model (LoRA already merged), e.g. ``LlamaModel``.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    decoder.config.is_causal = False
    decoder.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    pooler_state = {k: v.detach().cpu().contiguous() for k, v in pooler.state_dict().items()}
    meta: dict[str, Any] = {
        "format": ENCODER_FORMAT,
        "model_dir": "model",
        "tokenizer_dir": "tokenizer",
        "pooling": pooling,
        "pooler_args": dict(pooler_args or {}),
        "pooler_file": "pooler.safetensors" if pooler_state else None,
        "max_length": int(max_length),
        "instruction": instruction,
        "instructions": dict(instructions or {}),
        "dim": int(decoder.config.hidden_size),
        "dtype": dtype,
        **(extra or {}),
    }
    if pooler_state:
        save_file(pooler_state, str(tmp / "pooler.safetensors"), metadata={"format": "pt"})
    if adapter_dir is not None:
        shutil.copytree(adapter_dir, tmp / "adapter")
        meta["adapter_dir"] = "adapter"
    meta["fingerprint"] = compute_fingerprint(tmp, meta)
    (tmp / "encoder.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def export_final(module: nn.Module, cfg: Any, out: str | Path, dtype: Any) -> Path | None:
    """Write ``RUN/final/`` from a trained ``Stage1Module`` (every rank calls; rank 0 writes).

    The trained tensors (LoRA, pooler) are gathered whole; rank 0 then rebuilds the same encoder in
    plain ``dtype`` (never 4-bit: merging LoRA into NF4 weights would round it away), loads them,
    saves the adapter alone, merges it, and saves the decoder + pooler + tokenizer + encoder.json.
    """
    import dataclasses

    import torch

    from llmclip.checkpoint import full_parameter, trainable_parameters
    from llmclip.distributed import rank
    from llmclip.text.encoder import LLMEncoder, pooler_args

    weights = {name: full_parameter(p) for name, p in trainable_parameters(module)}
    if rank() != 0:
        return None
    plain = dataclasses.replace(cfg.model, quantization="none", gradient_checkpointing=False)
    enc = LLMEncoder.build(plain, dtype)
    fresh = dict(nn.ModuleDict({"encoder": enc}).named_parameters())
    missing = sorted(set(weights) - set(fresh))
    if missing:
        raise RuntimeError(f"export: trained parameters not found in the rebuilt encoder: {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            fresh[name].copy_(value.to(fresh[name].dtype))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".adapter-") as tmp:
        adapter = None
        lm = enc.lm
        if hasattr(lm, "merge_and_unload"):
            adapter = Path(tmp) / "adapter"
            lm.save_pretrained(adapter)
            lm = lm.merge_and_unload()
        decoder = getattr(lm, lm.base_model_prefix, lm)
        extra = {"stage": 1, "base_model": cfg.model.source, "keep_layers": cfg.model.keep_layers,
                 "layers": int(decoder.config.num_hidden_layers), "trained_steps": cfg.optim.max_steps}
        return save_encoder_dir(
            out, decoder, enc.tokenizer, enc.pooler, pooling=cfg.model.pooling,
            max_length=cfg.model.max_length, dtype=str(dtype).replace("torch.", ""), instruction=None,
            instructions=dict(cfg.stage1.instructions), pooler_args=pooler_args(cfg.model),
            adapter_dir=adapter, extra=extra)
