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
