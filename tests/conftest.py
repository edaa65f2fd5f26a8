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
