"""LLMEncoder: a decoder LLM with bidirectional attention, LoRA, and a pooler, as a report encoder.

Two ways in:
- ``LLMEncoder.build(cfg, dtype)`` for training: the causal-LM checkpoint (its LM head serves MNTP),
  optionally truncated to its first ``keep_layers`` layers, optionally 4-bit NF4, with peft LoRA;
- ``LLMEncoder.from_dir(path)`` for a finished encoder dir (``RUN/final/``): the merged decoder in
  safetensors (``AutoModel``), the pooler, the tokenizer and ``encoder.json``.

Texts are tokenised as ``[bos] instruction-prefix report [eos?]``, right padded; ``pool_mask`` marks
only the report tokens, so an instruction steers the states but is never averaged into them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from llmclip.config import ConfigError
from llmclip.text.attention import make_bidirectional, pick_attention
from llmclip.text.batching import _split_points, balanced_batches
from llmclip.text.model_config import ModelConfig, pooler_args
from llmclip.text.pooling import build_pooler
from llmclip.text.sources import check_decoder, resolve_source

ENCODER_FORMAT = "llmclip-encoder/1"


class LLMEncoder(nn.Module):
    """Decoder LLM + pooler. ``forward`` maps token ids to embeddings [b, dim] (float32)."""

    def __init__(self, lm: nn.Module, tokenizer: Any, pooler: nn.Module, *, pooling: str,
                 max_length: int, meta: dict[str, Any] | None = None):
        super().__init__()
        self.lm = lm
        self.pooler = pooler
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.meta = dict(meta or {})
        self.fingerprint: str = self.meta.get("fingerprint", "")
        self.instruction: str | None = self.meta.get("instruction")
        base = self.base_model
        cfg = base.config
        self.dim: int = int(cfg.hidden_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ConfigError("tokenizer has neither a pad nor an eos token", "model.source")

    # ---------------------------------------------------------------- module access
    @property
    def base_model(self) -> nn.Module:
        """The transformers model under any peft wrapper (LoRA layers are injected in place)."""
        get = getattr(self.lm, "get_base_model", None)
        return get() if callable(get) else self.lm

    @property
    def decoder(self) -> nn.Module:
        """The decoder stack that returns hidden states (``model`` inside a ``*ForCausalLM``)."""
        base = self.base_model
        return getattr(base, base.base_model_prefix, base)

    @property
    def lm_head(self) -> nn.Module | None:
        """Output embedding for MNTP; None for an exported encoder (decoder only)."""
        base = self.base_model
        return base.get_output_embeddings() if base is not self.decoder else None

    # ---------------------------------------------------------------- tokenisation
    def tokenize(self, texts: list[str], instruction: str | list[str | None] | None = None,
                 device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Right-padded ids, attention mask and pool mask (report tokens only) for ``texts``.

        ``instruction`` is one instruction for every text, or one per text (None/"" = none).
        """
        tok = self.tokenizer
        per_row = instruction if isinstance(instruction, list) else [instruction] * len(texts)
        if len(per_row) != len(texts):
            raise ValueError(f"{len(per_row)} instructions for {len(texts)} texts")
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        prefixes: dict[str | None, list[int]] = {}
        for ins in set(per_row):
            words = tok(ins.strip() + ":", add_special_tokens=False)["input_ids"] if ins else []
            prefixes[ins] = bos + words
        suffix = [tok.eos_token_id] if self.pooling == "last_token" and tok.eos_token_id is not None else []
        bodies = tok(list(texts), add_special_tokens=False)["input_ids"]
        rows, pools = [], []
        for body, ins in zip(bodies, per_row, strict=True):
            prefix = prefixes[ins]
            room = self.max_length - len(prefix) - len(suffix)
            if room < 1:
                raise ConfigError(f"instruction {ins!r} is longer than max_length {self.max_length}")
            body = body[:room] or [self.pad_id]  # an empty text still yields one pooled token
            rows.append(prefix + body + suffix)
            pools.append([0] * len(prefix) + [1] * (len(body) + len(suffix)))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        pool = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, p) in enumerate(zip(rows, pools, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            attn[i, : len(r)] = 1
            pool[i, : len(p)] = torch.tensor(p)
        out = {"input_ids": ids, "attention_mask": attn, "pool_mask": pool}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def tokenize_buckets(self, texts: list[str], instruction: str | list[str | None] | None = None,
                         buckets: int = 3) -> dict[str, Any]:
        """``texts`` split by length into at most ``buckets`` separately padded batches.

        Reports vary 5x in length; one padded batch spends about half its tokens on padding. The
        split points minimise the padded area (exact dynamic programme over the sorted lengths).
        ``inverse`` maps the concatenated bucket outputs back to the input order.
        """
        full = self.tokenize(texts, instruction)
        lengths = full["attention_mask"].sum(1).tolist()
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        cuts = _split_points([lengths[i] for i in order], buckets)
        out: dict[str, Any] = {"input_ids": [], "attention_mask": [], "pool_mask": []}
        for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True):
            idx = torch.tensor(order[a:b])
            width = int(lengths[order[b - 1]])  # right padding: the longest row's real tokens
            for k in out:
                out[k].append(full[k][idx, :width])
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        out["inverse"] = inverse
        return out

    def embed_buckets(self, b: dict[str, Any]) -> torch.Tensor:
        """Embeddings of ``tokenize_buckets`` output, in the original text order."""
        parts = [self(i, a, p) for i, a, p in zip(b["input_ids"], b["attention_mask"], b["pool_mask"], strict=True)]
        return torch.cat(parts)[b["inverse"]]

    # ---------------------------------------------------------------- forward
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer token states [b, t, hidden] of the (bidirectional) decoder."""
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def pool(self, states: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        return self.pooler(states, pool_mask).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pool_mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self.hidden_states(input_ids, attention_mask), pool_mask)

    @torch.no_grad()
    def encode(self, texts: list[str], instruction: str | None = None, batch_tokens: int = 8192,
               progress: bool = False) -> torch.Tensor:
        """Embeddings [n, dim] float32 on the CPU, not normalised. Texts are sorted by length and
        batched by a token budget (fewer pad tokens, bounded memory); the output keeps input order."""
        if not texts:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        instruction = instruction if instruction is not None else self.instruction
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        lengths = [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        extra = self.tokenize([""], instruction)["input_ids"].shape[1] - 1  # prefix + suffix
        padded = [min(lengths[i] + extra, self.max_length) for i in order]
        batches = [order[a:b] for a, b in balanced_batches(padded, batch_tokens)]
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="encode", unit="batch")
        for idx in batches:
            enc = self.tokenize([texts[i] for i in idx], instruction, device=device)
            out[torch.tensor(idx)] = self(**enc).float().cpu()
        self.train(was_training)
        return out

    # ---------------------------------------------------------------- construction
    @classmethod
    def build(cls, cfg: ModelConfig, dtype: torch.dtype, ds_config: dict[str, Any] | None = None,
              lora: bool = True) -> LLMEncoder:
        """The training encoder: causal LM (+ LM head for MNTP), bidirectional, LoRA, pooler.

        Under ZeRO-3 the caller keeps an ``HfDeepSpeedConfig`` alive so non-quantised weights are
        partitioned while loading; 4-bit models are loaded whole on every rank and partitioned later.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        src = resolve_source(cfg.source, cfg.tiny, cfg.cache_dir or None)
        config = AutoConfig.from_pretrained(src, trust_remote_code=False)
        check_decoder(config.to_dict(), src)
        full = int(config.num_hidden_layers)
        if cfg.keep_layers:
            if cfg.keep_layers > full:
                raise ConfigError(f"{cfg.keep_layers} > the model's {full} layers", "model.keep_layers")
            config.num_hidden_layers = cfg.keep_layers
            if getattr(config, "layer_types", None):
                config.layer_types = list(config.layer_types)[: cfg.keep_layers]
        config.is_causal = False
        kwargs: dict[str, Any] = {}
        if cfg.quantization == "nf4":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=dtype)
        lm = AutoModelForCausalLM.from_pretrained(
            src, config=config, dtype=dtype, attn_implementation=pick_attention(cfg.attention),
            trust_remote_code=False, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
        make_bidirectional(lm)
        if cfg.kernels != "none":  # before peft: patches this instance's norms, MLPs and RoPE only
            from llmclip.text.kernels import apply_liger

            apply_liger(lm, required=cfg.kernels == "liger")
        lm.config.use_cache = False
        if cfg.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora and cfg.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lm = get_peft_model(lm, LoraConfig(
                r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules), bias="none"))
        elif lora:
            for p in lm.parameters():
                p.requires_grad_(True)
        else:
            lm.requires_grad_(False)
        # One dtype for everything DeepSpeed partitions (peft makes fp32 adapters by default; ZeRO-3
        # refuses mixed dtypes). DeepSpeed keeps the fp32 master copies of the trainable weights.
        for p in lm.parameters():
            if p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
        pooler = build_pooler(cfg.pooling, int(config.hidden_size), **pooler_args(cfg))
        pooler.to(dtype=dtype)
        meta = {"base_model": cfg.source, "resolved_source": src, "keep_layers": cfg.keep_layers,
                "layers": int(config.num_hidden_layers), "base_layers": full}
        return cls(lm, tokenizer, pooler, pooling=cfg.pooling, max_length=cfg.max_length, meta=meta)

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, attention: str = "auto") -> LLMEncoder:
        """Load a finished encoder dir (``encoder.json`` + ``model/`` + ``tokenizer/`` + pooler)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = Path(path)
        meta_path = path / "encoder.json"
        if not meta_path.is_file():
            raise ConfigError(f"{path} is not an encoder dir (no encoder.json)", "encoder")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{meta_path}: not valid JSON: {e}", "encoder") from None
        if meta.get("format") != ENCODER_FORMAT:
            raise ConfigError(f"{meta_path}: format {meta.get('format')!r}, expected {ENCODER_FORMAT}")
        model_dir = path / meta.get("model_dir", "model")
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        check_decoder(config.to_dict(), str(model_dir))
        dtype = dtype or getattr(torch, meta.get("dtype", "float32"))
        try:  # safetensors only (a pickled .bin is never considered); a wrong shape is refused
            lm = AutoModel.from_pretrained(model_dir, dtype=dtype, attn_implementation=pick_attention(attention),
                                           trust_remote_code=False, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as e:
            why = " ".join(str(e).split())[:300]
            raise ConfigError(f"{model_dir}: cannot load the decoder ({type(e).__name__}: {why})",
                              "encoder") from None
        make_bidirectional(lm)
        lm.requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(path / meta.get("tokenizer_dir", "tokenizer"),
                                                  trust_remote_code=False)
        pooler = build_pooler(meta["pooling"], int(config.hidden_size), **meta.get("pooler_args", {}))
        if meta.get("pooler_file"):
            try:
                pooler.load_state_dict(load_file(str(path / meta["pooler_file"])))
            except Exception as e:  # noqa: BLE001 - SafetensorError, size mismatch, missing keys
                why = " ".join(str(e).split())[:300]
                raise ConfigError(f"{path / meta['pooler_file']}: refused ({type(e).__name__}: {why})",
                                  "encoder") from None
        pooler.to(dtype=dtype).requires_grad_(False)
        enc = cls(lm, tokenizer, pooler, pooling=meta["pooling"], max_length=int(meta["max_length"]), meta=meta)
        return enc.to(device).eval()
