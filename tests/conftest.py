"""Shared fixtures. Each area appends its own session-scoped fixtures below (tiny assets built once)."""

from __future__ import annotations

import os

# Tests must never reach a hub; everything they use is built here or ships in installed packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- data: small Open-I shards (real reports from torchxrayvision, rendered phantom images) ---
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def openi_shards(tmp_path_factory):
    """Shard folder of the first 240 Open-I reports: 64 px rendered JPEGs, 32 samples per shard,
    train/val/test by patient (~190/25/25 samples; 6+1+1 shards). Built once per session."""
    from llmclip.data.build import BuildOptions, build

    out = tmp_path_factory.mktemp("openi_shards") / "shards"
    build(BuildOptions(source="openi", out=str(out), images="render", maxcount=240, shard_size=32,
                       image_size=64, workers=2), progress=False)
    return out


# --- stage 1: a tiny encoder dir (random 2-layer Llama + the real SmolLM2 tokenizer) ---
@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """An encoder dir loadable by ``LLMEncoder.from_dir``: a 2-layer, 64-wide Llama built from a
    config with seeded random weights, the real SmolLM2 tokenizer, mean pooling, fp32."""
    import torch

    from llmclip.text.encoder import LLMEncoder, ModelConfig
    from llmclip.text.export import save_encoder_dir

    enc = LLMEncoder.build(ModelConfig(source="tiny:llama", attention="sdpa", max_length=128), torch.float32,
                           lora=False)
    out = tmp_path_factory.mktemp("stage1") / "tiny-encoder"
    return save_encoder_dir(out, enc.decoder, enc.tokenizer, enc.pooler, pooling="mean", max_length=128,
                            dtype="float32", extra={"base_model": "tiny:llama"})
