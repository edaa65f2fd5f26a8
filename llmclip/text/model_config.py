"""The ``model:`` section of a recipe: which LLM, how it is loaded, its LoRA adapters and its pooler.

``pooler_args`` is the part of it a finished encoder needs again: ``encoder.json`` records it, so
``LLMEncoder.from_dir`` rebuilds the same pooler without the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from llmclip.config import ConfigError
from llmclip.text.sources import TinyLlamaSpec, check_source

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
                raise ConfigError("flash_attention_2 needs CUDA and the flash-attn package (pip install "
                                  "flash-attn --no-build-isolation); use attention: auto or sdpa on this "
                                  "machine", "attention")
        if self.kernels != "auto":
            from llmclip.text.kernels import check_kernels_choice

            check_kernels_choice(self.kernels)


def pooler_args(cfg: ModelConfig) -> dict[str, Any]:
    """Pooler constructor arguments recorded in ``encoder.json`` (so ``from_dir`` rebuilds it)."""
    args: dict[str, Any] = {}
    if cfg.pooling == "latent_attention":
        args.update(num_latents=cfg.pooler_latents, num_heads=cfg.pooler_heads)
    if cfg.standardize:
        args["standardize"] = True
    return args
