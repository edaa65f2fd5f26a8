"""Stage-2 training state on disk: resumable checkpoints and the exported final model.

``RUN/checkpoints/step-000050/`` (written as ``step-000050.tmp`` then renamed, so a folder without
``.tmp`` is complete):
- ``model.safetensors``: every model weight (rank 0; gathered first under ZeRO-3);
- ``optim-rank{r}.pt``: rank r's ZeRO partition, i.e. its fp32 master slice and the torch AdamW
  state over it (``torch.save`` of tensors and numbers only, read with ``weights_only=True``);
- ``scheduler.pt``: the LR scheduler state; ``state.json``: step, data position of every rank,
  world size, ZeRO stage.
``RUN/checkpoints/latest`` names the newest complete checkpoint. DeepSpeed's own
``save_checkpoint`` pickles Python objects, which a resumed run would have to unpickle; this keeps
checkpoints data-only. Resuming needs the same world size and ZeRO stage (checked).

``RUN/final/``: ``model.safetensors`` + ``clip.json`` (model config, image size, text dim, cache
fingerprint, encoder folder), what ``llmclip.clip.inference.load`` reads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from llmclip.config import ConfigError
from llmclip.distributed import DistEnv, barrier

STEP_PREFIX = "step-"


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


def zero_stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage())


def full_state_dict(engine: Any, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of ``module`` as a full fp32 CPU tensor (gathered from partitions under ZeRO-3)."""
    if zero_stage(engine) == 3:
        import deepspeed

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def _partition_state(engine: Any) -> dict[str, Any]:
    """This rank's optimizer partition as tensors and numbers only."""
    opt = engine.optimizer
    stage = zero_stage(engine)
    if stage in (1, 2):
        return {
            "base": opt.optimizer.state_dict(),
            "fp32": [t.detach().cpu().clone() for t in opt.single_partition_of_fp32_groups],
        }
    if stage == 3:
        opt._set_fp32_optimizer_param_groups()
        try:
            base = opt.optimizer.state_dict()
        finally:
            opt._clear_fp32_optimizer_param_groups()
        return {
            "base": base,
            "fp32": [t.detach().cpu().clone() for t in opt.fp32_partitioned_groups_flat],
        }
    inner = getattr(opt, "optimizer", opt) if not isinstance(opt, torch.optim.Optimizer) else opt
    return {"base": inner.state_dict(), "fp32": []}


def _restore_partition(
    engine: Any, module: torch.nn.Module, weights: dict[str, torch.Tensor], part: dict[str, Any]
) -> None:
    opt = engine.optimizer
    stage = zero_stage(engine)
    if stage == 3:
        opt._set_fp32_optimizer_param_groups()
        try:
            opt.optimizer.load_state_dict(part["base"])
        finally:
            opt._clear_fp32_optimizer_param_groups()
        # fp32 masters, then the working (bf16/fp32) partitions from them, as DeepSpeed's own loader does.
        for cur, saved in zip(opt.fp32_partitioned_groups_flat, part["fp32"], strict=True):
            cur.data.copy_(saved.to(cur.device, cur.dtype))
        for i, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
            if fp32.numel() > 0:
                opt.fp16_partitioned_groups_flat[i].data.copy_(fp32.data)
            updated = opt.unflatten(
                opt.fp16_partitioned_groups_flat[i], opt.fp16_partitioned_groups[i]
            )
            for p, q in zip(opt.fp16_partitioned_groups[i], updated, strict=True):
                p.data = q.data
        return
    # ZeRO 0-2: parameters are replicated; load them, then the partitioned masters and moments.
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if stage in (1, 2):
        opt.optimizer.load_state_dict(part["base"])
        for cur, saved in zip(opt.single_partition_of_fp32_groups, part["fp32"], strict=True):
            cur.data.copy_(saved.to(cur.device, cur.dtype))
    else:
        inner = opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer
        inner.load_state_dict(part["base"])


def save(
    out: Path,
    step: int,
    engine: Any,
    scheduler: Any,
    extra: dict[str, Any],
    env: DistEnv,
    keep: int,
) -> Path:
    """Write ``RUN/checkpoints/step-NNNNNN`` from every rank, atomically; prune to ``keep``."""
    from safetensors.torch import save_file

    root = out / "checkpoints"
    final = root / f"{STEP_PREFIX}{step:06d}"
    tmp = root / f"{final.name}.tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    weights = full_state_dict(engine, engine.module)
    torch.save(_partition_state(engine), tmp / f"optim-rank{env.rank}.pt")
    if env.is_main:
        save_file(weights, str(tmp / "model.safetensors"))
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        state = {
            "step": step,
            "world_size": env.world_size,
            "zero_stage": zero_stage(engine),
            **extra,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    barrier()
    if env.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_text(root / "latest", final.name + "\n")
        done = sorted(
            p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp")
        )
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = out / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text(encoding="utf-8").strip()
        if cand.is_dir() and (cand / "state.json").is_file():
            return cand
    done = sorted(
        p
        for p in root.glob(f"{STEP_PREFIX}*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / "state.json").is_file()
    )
    return done[-1] if done else None


def load_latest(out: Path, engine: Any, scheduler: Any, env: DistEnv) -> dict[str, Any] | None:
    """Restore weights, optimizer partitions and scheduler from the latest checkpoint; its state.json."""
    from safetensors.torch import load_file

    path = latest(out)
    if path is None:
        return None
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}/state.json is unreadable: {e!r}") from None
    if state.get("world_size") != env.world_size or state.get("zero_stage") != zero_stage(engine):
        raise ConfigError(
            f"{path} was written by {state.get('world_size')} ranks with ZeRO-{state.get('zero_stage')}; "
            f"this run has {env.world_size} ranks with ZeRO-{zero_stage(engine)} (resume with the same, "
            "or set run.resume=false with a new run.out_dir)",
            "run.resume",
        )
    try:
        weights = load_file(str(path / "model.safetensors"))
        part = torch.load(path / f"optim-rank{env.rank}.pt", map_location="cpu", weights_only=True)
        sched = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable/unsafe file is a bad checkpoint
        raise ConfigError(f"checkpoint {path} is unreadable or unsafe: {e}") from None
    _restore_partition(engine, engine.module, weights, part)
    scheduler.load_state_dict(sched)
    state["step"] = step
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return state


def export_final(
    out: Path, engine: Any, module: torch.nn.Module, meta: dict[str, Any], env: DistEnv
) -> Path:
    """``RUN/final/`` with the model weights and ``clip.json``, renamed into place when complete."""
    from safetensors.torch import save_file

    final = out / "final"
    weights = full_state_dict(engine, module)
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
