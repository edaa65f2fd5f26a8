"""Attention of a decoder LLM used as an encoder: the kernel it is loaded with, and its mask.

An encoder's token states should see the whole report, so the causal mask is dropped
(``make_bidirectional``); ``make_causal`` restores it for the untrained-LLM baseline.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------ fp32 attention under autocast
FP32_SDPA = "llmclip_sdpa_fp32"


def _sdpa_fp32(sdpa: Callable, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' own SDPA forward (``sdpa``), run on fp32 q, k, v with autocast off (the
    projections around it stay in bf16). PyTorch's CPU flash-attention kernel is slower in bf16 than
    in fp32: forward + backward at report lengths (9 heads of 64, 48-192 tokens, ~4K tokens a batch)
    ran 1.2-2.8x faster in fp32 on an AVX512-BF16 CPU (one-off microbenchmark, 2026-12-03). fp32 is
    also the more accurate of the two."""
    with torch.autocast(query.device.type, enabled=False):
        return sdpa(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


def use_fp32_attention(model: nn.Module) -> bool:
    """Run an ``sdpa`` model's attention kernel in fp32 under a bf16 autocast (CPU training).
    Registered with transformers' attention and mask interfaces under ``FP32_SDPA`` (the mask is
    SDPA's own); nothing is saved with the model, an exported ``config.json`` is unchanged. Returns
    False (and changes nothing) for models loaded with another kernel (eager, flash-attention)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    # Bound here, once: the kernel runs in every layer of every forward.
    AttentionInterface.register(FP32_SDPA, functools.partial(_sdpa_fp32, sdpa_attention_forward))
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)
    model.set_attn_implementation(FP32_SDPA)
    log.info("attention kernel in fp32 under bf16 autocast (%s)", FP32_SDPA)
    return True
