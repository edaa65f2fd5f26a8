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
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from llmclip.config import ConfigError
from llmclip.text.pooling import build_pooler
from llmclip.text.sources import TinyLlamaSpec, check_decoder, check_source, resolve_source

log = logging.getLogger(__name__)

ENCODER_FORMAT = "llmclip-encoder/1"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSection:
    """peft LoRA adapters on the decoder's linear layers."""

    enabled: bool = True
    """Train LoRA adapters (required with 4-bit weights); false = train every decoder weight."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layer names that get adapters."""

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError("must be >= 1", "r")
        if self.alpha < 1:
            raise ConfigError("must be >= 1 (the adapter scale is alpha / r)", "alpha")
        if not 0 <= self.dropout < 1:
            raise ConfigError("must be in [0, 1)", "dropout")
        if not self.target_modules:
            raise ConfigError("must name at least one module", "target_modules")


@dataclass
class ModelConfig:
    """The LLM, how it is loaded, and how its states become one embedding."""

    source: str = "asset:smollm2-135m"
    """Model folder, .gguf file, hub id, ``asset:smollm2-135m``, ``asset:gemma3-270m`` or
    ``tiny:llama|mistral|qwen2|gemma3``."""
    tiny: TinyLlamaSpec = field(default_factory=TinyLlamaSpec)
    """Shape of the ``tiny:*`` models (used only when source is one of them)."""
    cache_dir: str = ""
    """Where converted/built models are kept; empty = $LLMCLIP_CACHE or ./.assets."""
    quantization: Literal["none", "nf4"] = "none"
    """``nf4`` = bitsandbytes 4-bit NF4 base weights (QLoRA), storage dtype = training dtype."""
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel; ``auto`` = flash_attention_2 when flash-attn and CUDA are present, else sdpa."""
    kernels: Literal["auto", "none", "liger"] = "auto"
    """Fused Liger RMSNorm/SwiGLU/RoPE; ``auto`` = when CUDA + liger-kernel are present, ``liger`` = required."""
    keep_layers: int = 0
    """Use only the first N decoder layers (small CPU recipes); 0 = all."""
    max_length: int = 512
    """Token limit per text, instruction prefix included."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in backward (GPU memory for long sequences)."""
    pooling: Literal["mean", "latent_attention", "last_token"] = "mean"
    """How token states become one vector."""
    pooler_latents: int = 512
    """Trainable latents of the latent-attention pooler."""
    pooler_heads: int = 8
    """Heads of the latent-attention pooler (must divide the hidden size)."""
    standardize: bool = False
    """Centre and scale each pooled dimension with statistics of training reports (measured before
    step 1, then trained): removes the near-constant outlier dimensions that dominate LLM cosines."""
    calibration_reports: int = 256
    """Training reports per rank measured for ``standardize``."""
    lora: LoraSection = field(default_factory=LoraSection)
    """LoRA adapter settings."""

    def validate(self) -> None:
        if not self.source:
            raise ConfigError("must not be empty", "source")
        check_source(self.source)
        if self.calibration_reports < 1:
            raise ConfigError("must be >= 1", "calibration_reports")
        if self.keep_layers < 0:
            raise ConfigError("must be >= 0", "keep_layers")
        for name in ("pooler_latents", "pooler_heads"):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", name)
        if self.max_length < 8:
            raise ConfigError("must be >= 8", "max_length")
        if self.quantization == "nf4" and not self.lora.enabled:
            raise ConfigError("4-bit weights cannot be trained directly; enable lora", "quantization")
        if self.attention == "flash_attention_2":
            from transformers.utils import is_flash_attn_2_available

            if not torch.cuda.is_available() or not is_flash_attn_2_available():
                raise ConfigError("flash_attention_2 needs CUDA and the flash-attn package; "
                                  "use attention: auto or sdpa on this machine", "attention")
        if self.kernels != "auto":
            from llmclip.text.kernels import check_kernels_choice

            check_kernels_choice(self.kernels)


def pick_attention(requested: str) -> str:
    """The attention kernel to load with; ``auto`` prefers flash-attention 2 on CUDA. Logged."""
    if requested != "auto":
        chosen = requested
    else:
        from transformers.utils import is_flash_attn_2_available

        flash = torch.cuda.is_available() and is_flash_attn_2_available()
        chosen = "flash_attention_2" if flash else "sdpa"
    log.info("attention implementation: %s (requested %s)", chosen, requested)
    return chosen


# Families with their own bidirectional switch besides ``config.is_causal``. Gemma 3 text reads
# ``use_bidirectional_attention`` (EmbeddingGemma's) in its mask builder and when it builds each
# attention module, so setting it too keeps the exported ``config.json`` bidirectional for a plain
# ``AutoModel.from_pretrained`` even where ``is_causal`` is not forwarded to the kernels. Set on a
# built config it leaves the in-memory ``sliding_window`` as it is; ``Gemma3TextConfig.to_dict``
# then writes 2 * (window - 1), which its ``__post_init__`` turns back into the same window on load
# (local layers see ``window`` tokens each side, the reach the causal model had backwards).
BIDIRECTIONAL_SWITCHES = {"gemma3_text": "use_bidirectional_attention"}


def _set_causal(model: nn.Module, causal: bool) -> None:
    model.config.is_causal = causal
    for module in model.modules():
        if hasattr(module, "is_causal") and isinstance(module.is_causal, bool):
            module.is_causal = causal
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "model_type"):
            cfg.is_causal = causal
            switch = BIDIRECTIONAL_SWITCHES.get(cfg.model_type)
            if switch and hasattr(cfg, switch):
                setattr(cfg, switch, not causal)


def make_bidirectional(model: nn.Module) -> None:
    """Drop the causal mask (padding stays masked). Both switches are needed in transformers 5:
    ``config.is_causal`` selects the bidirectional mask, and each attention module's ``is_causal``
    stops SDPA/flash from re-adding causality when the mask is skipped (no padding in the batch).
    Families in ``BIDIRECTIONAL_SWITCHES`` get their own flag as well (Gemma 3)."""
    _set_causal(model, False)


def make_causal(model: nn.Module) -> None:
    """Restore the decoder's own causal attention (the untrained-LLM baseline)."""
    _set_causal(model, True)


def balanced_batches(padded: list[int], budget: int) -> list[tuple[int, int]]:
    """``(start, end)`` runs of a longest-first length list, each at most ``budget`` padded tokens,
    as few as the greedy fill needs but evened out: the greedy fill leaves a small last batch per
    call, and a 3-row batch runs the decoder's matmuls far below their speed at 30 rows. The
    budget is lowered while the count stays the same, which spreads the rows evenly."""

    def fill(cap: int) -> list[tuple[int, int]]:
        runs, start = [], 0
        while start < len(padded):
            size = max(1, cap // max(1, padded[start]))
            runs.append((start, min(start + size, len(padded))))
            start += size
        return runs

    count = len(fill(budget))
    lo, hi = 1, budget  # the smallest cap that needs no more runs than the full budget
    while lo < hi:
        mid = (lo + hi) // 2
        if len(fill(mid)) <= count:
            hi = mid
        else:
            lo = mid + 1
    return fill(lo)

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


def _split_points(lengths: list[int], k: int) -> list[int]:
    """Cut points of sorted ``lengths`` into min(k, n) groups minimising sum(len(group) * max)."""
    n = len(lengths)
    if n == 0:
        return []
    k = max(1, min(k, n))
    inf = float("inf")
    # best[j][i]: least padded area of the first i items in j groups; a group (a, i] costs (i-a)*len[i-1].
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(1, n + 1):
            for a in range(j - 1, i):
                cost = best[j - 1][a] + (i - a) * lengths[i - 1]
                if cost < best[j][i]:
                    best[j][i], back[j][i] = cost, a
    # Exactly min(k, n) groups, even where fewer would pad as little: every rank of a ZeRO-3 run
    # must run the same number of forwards (each one gathers the weights collectively).
    j = k
    cuts, i = [], n
    while j > 1:
        i = back[j][i]
        cuts.append(i)
        j -= 1
    return sorted(c for c in cuts if 0 < c < n)


def pooler_args(cfg: ModelConfig) -> dict[str, Any]:
    """Pooler constructor arguments recorded in ``encoder.json`` (so ``from_dir`` rebuilds it)."""
    args: dict[str, Any] = {}
    if cfg.pooling == "latent_attention":
        args.update(num_latents=cfg.pooler_latents, num_heads=cfg.pooler_heads)
    if cfg.standardize:
        args["standardize"] = True
    return args
