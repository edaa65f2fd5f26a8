"""Fixtures of the multi-node suite (``pytest -m multinode``): shard subsets small enough that a
test run covers a whole epoch, and the tools of tests/faults."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

# The tools of tests/faults (fault_tools: recipes, Proc, rank_env) are shared with this suite.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/faults: fault_tools


@pytest.fixture(scope="session")
def one_shard(openi_shards, tmp_path_factory) -> Path:
    """``openi_shards`` cut to its first train shard (32 samples; the files are links): an epoch
    of stage 1 fits in a few steps."""
    root = tmp_path_factory.mktemp("one_shard") / "shards"
    root.mkdir()
    m = json.loads((openi_shards / "manifest.json").read_text())
    m["shards"] = [s for s in m["shards"] if s["split"] == "train" and s["index"] == 0]
    m["splits"] = {"train": m["shards"][0]["count"], "val": 0, "test": 0}
    (root / "manifest.json").write_text(json.dumps(m))
    for sub in ("images", "text"):
        os.symlink(openi_shards / sub, root / sub)
    return root
