"""The DeepSpeed JSON a run hands to ``deepspeed.initialize``: the user's file, checked, with the
run's own values filled in. One builder for stage 1 and stage 2.

The run owns batch sizes, gradient clipping, precision and (when ``deepspeed.zero_stage`` is set)
the ZeRO stage: those are overwritten, so the YAML recipe is the single source of truth. The
monitor blocks are the user's and are merged, never replaced:

- ``tensorboard``: on when ``run.tensorboard`` is true *or* the JSON enables it; an ``output_path``
  or ``job_name`` the JSON sets is kept, a missing or empty one becomes ``RUN/tb`` and the stage name.
- ``wandb``, ``csv_monitor``, ``comet``: passed through untouched. DeepSpeed's monitor sends every
  metric the trainers log (``engine.monitor.write_events``) to each enabled one, so Weights & Biases
  needs only ``"wandb": {"enabled": true, "project": "..."}`` in the JSON (and ``pip install wandb``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmclip.config import ConfigError, DeepSpeedSection, RunConfig


def _walk(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _walk(v, f"{prefix}.{k}" if prefix else k)]
    return [(prefix, node)]


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """The user's DeepSpeed JSON, refused with the file named when it cannot drive a run."""
    path = Path(path)
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read DeepSpeed JSON {path}: {e}", "deepspeed.config") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: top level must be an object", "deepspeed.config")
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(
            f"{path}: leave out 'optimizer'/'scheduler' (the trainer passes torch AdamW and its "
            "schedule; DeepSpeed's would need compiled ops)",
            "deepspeed.config",
        )
    auto = [k for k, v in _walk(ds) if v == "auto"]
    if auto:
        raise ConfigError(
            f"{path}: 'auto' is only resolved by the HF Trainer; write {auto[0]} explicitly",
            "deepspeed.config",
        )
    for name in ("tensorboard", "wandb", "csv_monitor", "comet"):
        if name in ds and not isinstance(ds[name], dict):
            raise ConfigError(f"{path}: '{name}' must be an object", "deepspeed.config")
    return ds


def build_deepspeed_config(
    d: DeepSpeedSection, run: RunConfig, grad_clip: float, world: int, job: str, bf16: bool
) -> dict[str, Any]:
    """``d.config`` with batch sizes, clip, precision, ZeRO stage and monitors filled in."""
    ds = read_deepspeed_json(d.config)
    ds["train_micro_batch_size_per_gpu"] = d.micro_batch_size
    ds["gradient_accumulation_steps"] = d.grad_accum
    ds["train_batch_size"] = d.micro_batch_size * d.grad_accum * world
    ds["gradient_clipping"] = grad_clip
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bool(bf16)}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": False}
    ds.setdefault("zero_optimization", {})
    if d.zero_stage is not None:
        ds["zero_optimization"]["stage"] = d.zero_stage
    ds["zero_allow_untested_optimizer"] = True  # a torch AdamW client optimizer (no compiled ops)
    tb = dict(ds.get("tensorboard", {}))
    tb["enabled"] = bool(run.tensorboard or tb.get("enabled", False))
    tb["output_path"] = tb.get("output_path") or str(Path(run.out_dir) / "tb")
    tb["job_name"] = tb.get("job_name") or job
    ds["tensorboard"] = tb
    ds.setdefault("steps_per_print", 10**9)
    return ds
