"""The encoders ``llmclip eval text`` compares: the stage-1 encoder and its baselines (TF-IDF,
all-MiniLM-L6-v2 as sentence-transformers runs it, and the untrained base LLM)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llmclip.eval.suite import Encode, TextSuite


def llm_encoder(enc: Any, batch_tokens: int) -> Encode:
    def f(texts: list[str], instruction: str | None) -> np.ndarray:
        return enc.encode(texts, instruction=instruction or "", batch_tokens=batch_tokens).numpy()

    return f


def minilm_encoder(batch_size: int = 64) -> Encode:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean over tokens, max 256 tokens."""
    from transformers import AutoModel, AutoTokenizer

    from llmclip.assets import minilm_dir

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = AutoModel.from_pretrained(path, trust_remote_code=False).eval()

    @torch.no_grad()
    def f(texts: list[str], instruction: str | None) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            b = tok(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            out.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).numpy())
        return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)

    return f


def tfidf_encoder(suite: TextSuite) -> Encode:
    """TF-IDF fitted on every text of the suite (unsupervised), sublinear term frequency."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    corpus = suite.reports + suite.findings + suite.impressions
    for items in (suite.error_items, suite.heldout_items):
        corpus += [t for _, rw, eds, _ in items for t in [rw, *eds]]
    corpus += [t for _, t in suite.abbreviated + suite.heldout_abbreviated]
    vec = TfidfVectorizer(lowercase=True, sublinear_tf=True).fit(corpus)

    def f(texts: list[str], instruction: str | None) -> np.ndarray:
        return vec.transform(texts).toarray().astype(np.float32)

    return f


def base_llm_encoder(
    meta: dict[str, Any], dtype: torch.dtype, max_length: int, batch_tokens: int
) -> Encode:
    """The encoder's base LLM before stage 1: same first layers, causal attention, mean pooling."""
    from llmclip.text.attention import make_causal
    from llmclip.text.encoder import LLMEncoder
    from llmclip.text.model_config import ModelConfig

    cfg = ModelConfig(
        source=meta["base_model"],
        keep_layers=int(meta.get("keep_layers") or 0),
        attention="sdpa",
        max_length=max_length,
        pooling="mean",
    )
    enc = LLMEncoder.build(cfg, dtype, lora=False)
    make_causal(enc.base_model)
    return llm_encoder(enc.eval(), batch_tokens)
