"""Shared fixtures. Each area appends its own session-scoped fixtures below (tiny assets built once)."""

from __future__ import annotations

import os

# Tests must never reach a hub; everything they use is built here or ships in installed packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
