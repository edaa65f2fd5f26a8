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


def mark_zero3_leaves(module: Any, mode: str, ds_config: dict[str, Any] | None = None) -> int:
    """Make each LoRA-wrapped linear (``lora``) or each decoder layer (``layer``) one ZeRO-3 fetch
    unit; returns how many modules were marked. With ``layer``, ``ds_config``'s prefetch bucket is
    raised to one whole layer (``prefetch_whole_layer``).

    ZeRO-3 puts fetch/release and backward hooks on every submodule, and a peft LoRA linear is five
    of them (wrapper, frozen base, dropout, A, B): on an 8B QLoRA step of 12K tokens that host-side
    bookkeeping, not the GPU, set the pace. Marked leaves gather their whole subtree at their own
    forward, release it after, and their children get no hooks (the H200 figures are in the README's
    "Measured figures"). ``layer`` is FSDP's usual unit, the transformer block (the classes the model
    names in ``_no_split_modules``): one fetch per layer and call instead of one per linear, at the
    cost of holding a whole layer's weights at once. DeepSpeed reduces a leaf's gradients once per
    call, hence one forward per micro-step (``zero3_leaf_mode``). ``none`` keeps per-module hooks.
    A no-op where nothing is LoRA (stage 2's vision tower).
    """
    if mode == "none":
        return 0
    if mode not in ("lora", "layer"):
        raise ValueError(f"zero3_leaf mode must be lora, layer or none, got {mode!r}")
    from deepspeed.utils import set_z3_leaf_modules
    from peft.tuners.lora import LoraLayer
    from transformers import PreTrainedModel

    if not any(isinstance(m, LoraLayer) for m in module.modules()):
        return 0
    # DeepSpeed reduces a leaf's gradients in a full backward hook, which fires at the leaf's
    # *output* gradients when no input needs one (layer 0 of a frozen-embedding QLoRA model), that
    # is before the adapters' own gradients exist. Gradients w.r.t. the embeddings' output make
    # every leaf's input need one; transformers' gradient checkpointing has already asked for them.
    lm = next(m for m in module.modules() if isinstance(m, PreTrainedModel))
    if not hasattr(lm, "_require_grads_hook"):
        lm.enable_input_require_grads()
    if mode == "lora":
        return len(set_z3_leaf_modules(module, [LoraLayer]))
    blocks = set(getattr(lm, "_no_split_modules", None) or ())
    classes = list({type(m) for m in module.modules() if type(m).__name__ in blocks})
    if not classes:
        raise ValueError(f"{type(lm).__name__} names no decoder-layer class (_no_split_modules); "
                         "use deepspeed.zero3_leaf: lora")
    layers = set_z3_leaf_modules(module, classes)
    if ds_config is not None:
        prefetch_whole_layer(ds_config, layers)
    return len(layers)


def prefetch_whole_layer(ds_config: dict[str, Any], layers: list[Any]) -> None:
    """Raise ``stage3_prefetch_bucket_size`` to the largest layer's parameter count.

    ZeRO-3 prefetches upcoming parameters until the bucket is full, and a leaf's parameters are all
    needed at its first call. The usual bucket (0.9 x hidden^2, sized for one linear: 15.1M for an
    8B) holds under a third of an 8B NF4 layer (~56M storage elements), so two thirds of every
    layer would be gathered only when it starts, with nothing to hide them behind. One whole layer
    in flight is FSDP's scheme, and ``llmclip plan`` already budgets it (largest layer x 2).
    An explicit 0 (prefetch off) is kept. Counts are taken before ``deepspeed.initialize``, from
    ``ds_numel`` where loading already partitioned a weight.
    """
    zero = ds_config.setdefault("zero_optimization", {})
    largest = max((sum(int(getattr(p, "ds_numel", p.numel())) for p in m.parameters()) for m in layers),
                  default=0)
    bucket = int(zero.get("stage3_prefetch_bucket_size", 50_000_000))  # DeepSpeed's default
    if bucket > 0:
        zero["stage3_prefetch_bucket_size"] = max(bucket, largest)
