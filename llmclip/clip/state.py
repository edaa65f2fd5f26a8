"""Stage-2 run files: resolved config, resumable checkpoints (``llmclip.checkpoint``: data only,
``weights_only`` loads, any ZeRO stage, any world size) and the exported final model.

``RUN/final/``: ``model.safetensors`` (every weight, fp32) + ``clip.json`` (model config, image
size, text dim, cache fingerprint, encoder folder, instruction): what ``llmclip.load`` reads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from llmclip.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from llmclip.config import ConfigError
from llmclip.distributed import DistEnv, barrier


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_run_files(out: Path, config: dict[str, Any], ds_config: dict[str, Any]) -> None:
    """``RUN/config.yaml`` (resolved) and ``RUN/ds_config.json`` (as used)."""
    _atomic_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    _atomic_text(out / "ds_config.json", json.dumps(ds_config, indent=2) + "\n")


def encoder_fingerprint(encoder_dir: str) -> str | None:
    """The fingerprint recorded in a stage-1 encoder folder's ``encoder.json`` (None when not given)."""
    if not encoder_dir:
        return None
    path = Path(encoder_dir) / "encoder.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        fp = meta["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"cannot read the encoder fingerprint from {path}: {e!r}", "data.encoder"
        ) from None
    if not isinstance(fp, str) or not fp:
        raise ConfigError(f"{path}: 'fingerprint' must be a non-empty string", "data.encoder")
    return fp


def save(out: Path, step: int, engine: Any, extra: dict[str, Any], keep: int) -> Path:
    """A resumable checkpoint through ``llmclip.checkpoint`` (every rank calls)."""
    return save_checkpoint(out, step, engine, extra, keep=keep)


def load_latest(out: Path, engine: Any) -> dict[str, Any] | None:
    """Restore the latest complete checkpoint into ``engine``; its ``state.json`` (None: none yet)."""
    path = latest_checkpoint(out)
    if path is None:
        return None
    return load_checkpoint(path, engine)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of ``module`` as a full fp32 CPU tensor (gathered under ZeRO-3; all ranks call)."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def export_final(out: Path, module: torch.nn.Module, meta: dict[str, Any], env: DistEnv) -> Path:
    """``RUN/final/`` with the model weights and ``clip.json``, renamed into place when complete."""
    from safetensors.torch import save_file

    final = out / "final"
    weights = full_state_dict(module)
    if env.is_main:
        tmp = out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / "model.safetensors"))
        (tmp / "clip.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
    return final
