"""Atomic save / resume of a DeepSpeed run's trainable state: model-agnostic, ZeRO-stage-agnostic.

A checkpoint holds only what training changes, each parameter *whole* (gathered across ranks), so a
run can resume on a different number of ranks and no 4-bit base weight is ever serialised
(bitsandbytes refuses to produce a state dict of packed 4-bit weights on the CPU):

    RUN/checkpoints/step-000050/
        model.safetensors   every ``requires_grad`` parameter by name (LoRA, pooler, heads ...)
        optimizer.pt        per parameter: fp32 master copy + Adam moments; Adam step (torch.save of
                            tensors and numbers only, read back with ``weights_only=True``)
        scheduler.pt        the LR scheduler's state_dict (numbers only)
        state.json          step, data position, anything the trainer adds; written last
    RUN/checkpoints/latest  name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder and renamed into place, then ``latest`` is
replaced, then old checkpoints beyond ``keep`` are deleted: a kill at any moment leaves the previous
complete checkpoint usable, and a partial folder is never read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from llmclip.config import ConfigError, writing
from llmclip.distributed import barrier, rank

FORMAT = "llmclip-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, param)`` of every trainable parameter, in module order (names are the file keys)."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def full_parameter(param: nn.Parameter) -> torch.Tensor:
    """The whole parameter on the CPU (gathered when ZeRO-3 has partitioned it); every rank calls."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.data.detach().cpu().clone()
    return param.data.detach().cpu().clone()


def _set_full(param: nn.Parameter, value: torch.Tensor) -> None:
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value.to(param.data.dtype).view_as(param.data))
        return
    param.data.copy_(value.to(device=param.device, dtype=param.dtype).view_as(param.data))


def _set_hp(param: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """Write a whole fp32 master (``key`` None) or optimizer-state tensor into this rank's slice."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(param, "ds_id"):
        # ZeRO-3: DeepSpeed's own setter narrows past the end of the last rank's padded partition
        # when numel is not a multiple of the world size (any odd-sized parameter); copy the slice.
        opt = param._z3_optimizer
        part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
        flat = value.flatten().to(part.dtype)
        start = part.numel() * opt._get_param_partition_rank(param)
        n = max(0, min(part.numel(), flat.numel() - start))
        part.data.zero_()
        if n:
            part.data[:n].copy_(flat[start:start + n])
        return
    if key is None:
        safe_set_full_fp32_param(param, value)
    else:
        safe_set_full_optimizer_state(param, value, key)


def set_trainable(engine: Any, param: nn.Parameter, value: torch.Tensor) -> None:
    """Give a trainable parameter a new whole value, in the model and in DeepSpeed's fp32 master
    copy (every rank calls; e.g. a calibration before step 1)."""
    _set_full(param, value)
    if _wrapped(engine, param):
        _set_hp(param, value.float().to(param.device))


def _inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO / bf16 wrapper (or the client optimizer itself)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def _wrapped(engine: Any, param: nn.Parameter) -> bool:
    """True when DeepSpeed keeps this parameter's fp32 master and moments in flat partitions."""
    # ZeRO-1/2 give every parameter an ``_hp_mapping`` attribute, None on ranks whose partition holds
    # no fragment of it; the gather/scatter helpers are collectives, so every rank must take this path.
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _moment_keys(inner: torch.optim.Optimizer) -> list[str]:
    for state in inner.state.values():
        return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0)
    return []


def _adam_step(inner: torch.optim.Optimizer) -> float:
    for state in inner.state.values():
        step = state.get("step", 0)
        return float(step.item() if torch.is_tensor(step) else step)
    return 0.0


def _ensure_state(engine: Any, keys: list[str], step: float) -> None:
    """Create Adam-style state (zeros + step) where the optimizer has not stepped yet, so saved
    moments can be written into it; then let DeepSpeed link its per-parameter views to it."""
    inner = _inner_optimizer(engine)
    tensors = [p for group in inner.param_groups for p in group["params"]]
    # ZeRO-3 hands its flat fp32 partitions to the torch optimizer only during step().
    tensors += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [])
    seen: set[int] = set()
    for p in tensors:
        if id(p) in seen:
            continue
        seen.add(id(p))
        state = inner.state[p]
        for k in keys:
            if k not in state:
                state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(step))
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if callable(link):
        link()


def _relink_zero12_state(engine: Any) -> None:
    """Point every ZeRO-1/2 parameter fragment at its Adam moments again.

    DeepSpeed links fragments to optimizer state once, right after the *first parameter group's*
    first step; with two groups (decay / no decay) the second group's state did not exist yet, and
    reading it raised "exp_avg not found in optimizer state fragment" at the first checkpoint.
    Linking is idempotent, so it is redone before every read.
    """
    opt = engine.optimizer
    link = getattr(opt, "_lazy_init_hp_params_optimizer_state", None)
    if callable(link) and hasattr(opt, "_hp_optimizer_states_linked") and opt.optimizer.state:
        opt._hp_optimizer_states_linked = False
        link()


def _optimizer_tensors(engine: Any, params: list[tuple[str, nn.Parameter]]) -> dict[str, Any]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    inner = _inner_optimizer(engine)
    keys = _moment_keys(inner)
    _relink_zero12_state(engine)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in params:
        entry: dict[str, torch.Tensor] = {}
        if _wrapped(engine, p):
            entry["fp32"] = safe_get_full_fp32_param(p).detach().cpu().float().clone()
            for k in keys:
                # None: no state for this parameter yet (it has had no gradient, e.g. the pooler during
                # MNTP steps under ZeRO-1/2): its Adam moments are zero.
                v = safe_get_full_optimizer_state(p, k)
                v = torch.zeros(tuple(getattr(p, "ds_shape", p.shape))) if v is None else v
                entry[k] = v.detach().cpu().float().clone()
        else:
            entry["fp32"] = p.data.detach().cpu().float().clone()
            for k in keys:
                if k in inner.state.get(p, {}):
                    entry[k] = inner.state[p][k].detach().cpu().clone()
        out[name] = entry
    return {"format": FORMAT, "moment_keys": keys, "adam_step": _adam_step(inner), "params": out}


def save_checkpoint(run_dir: str | Path, step: int, engine: Any, state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write ``step-{step:06d}`` (every rank calls: gathers are collective; rank 0 writes)."""
    from safetensors.torch import save_file

    params = trainable_parameters(engine.module)
    weights = {name: full_parameter(p).contiguous() for name, p in params}
    optim = _optimizer_tensors(engine, params)
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else {}
        info = {"format": FORMAT, "step": int(step), "time": time.time(), **state}
        try:  # a full disk: an error naming the file, the temp folder's space back, `latest` kept
            with writing(tmp / "model.safetensors"):
                save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            with writing(tmp / "optimizer.pt"):
                torch.save(optim, tmp / "optimizer.pt")
            with writing(tmp / "scheduler.pt"):
                torch.save(sched, tmp / "scheduler.pt")
            with writing(tmp / "state.json"):
                (tmp / "state.json").write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep)
    barrier()
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".latest-{os.getpid()}"
    with writing(root / "latest"):
        tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(tmp, root / "latest")


def _complete(root: Path) -> list[Path]:
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def _prune(root: Path, keep: int) -> None:
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (``latest`` if valid, else the highest complete step)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if _STEP_DIR.match(name) and (root / name / "state.json").is_file():
            return root / name
    done = _complete(root)
    return done[-1] if done else None


def _read(file: Path, load: Any) -> Any:
    """``load(file)``; any failure (a pickle payload refused by ``weights_only``, a corrupt
    safetensors header, a truncated file) is a ``ConfigError`` naming the file."""
    try:
        return load(file)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, SafetensorError, OSError, EOFError ...
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"{file}: refused ({type(e).__name__}: {why})", "checkpoint") from None


def load_checkpoint(path: str | Path, engine: Any) -> dict[str, Any]:
    """Restore trainable weights, optimizer and scheduler into ``engine``; return ``state.json``.

    Every rank calls (scatters are collective). Names must match the model's trainable parameters
    exactly; anything else is a ``ConfigError`` naming the checkpoint. ``RUN/metrics.jsonl`` forgets
    the steps after the checkpoint (they will be logged again).
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        info = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable state.json: {e}", "checkpoint") from None
    if info.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {info.get('format')!r}, expected {FORMAT}", "checkpoint")
    weights = _read(path / "model.safetensors", lambda f: load_file(str(f)))
    optim = _read(path / "optimizer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
    sched = _read(path / "scheduler.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
    if not isinstance(optim, dict) or not isinstance(optim.get("params"), dict):
        raise ConfigError(f"{path / 'optimizer.pt'}: not an llmclip optimizer state", "checkpoint")
    params = trainable_parameters(engine.module)
    names = {n for n, _ in params}
    if set(weights) != names or set(optim.get("params", {})) != names:
        missing = sorted(names - set(weights))[:3]
        extra = sorted(set(weights) - names)[:3]
        raise ConfigError(f"{path} does not match this model's trainable parameters "
                          f"(missing {missing}, unexpected {extra}); was the config changed?", "checkpoint")
    keys = list(optim.get("moment_keys", []))
    for name, p in params:  # shapes before any state is touched: a wrong one is refused, not reshaped
        want = tuple(getattr(p, "ds_shape", p.shape))
        entry = optim["params"][name]
        found = [("model.safetensors", name, weights[name])] + [
            ("optimizer.pt", f"{name} ({k})", entry.get(k) if isinstance(entry, dict) else None)
            for k in ["fp32", *keys] if k == "fp32" or not isinstance(entry, dict) or k in entry]
        for file, what, t in found:
            if not torch.is_tensor(t) or tuple(t.shape) != want:
                shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ConfigError(f"{path / file}: {what} has shape {shape}, the model needs {want}",
                                  "checkpoint")
    if keys:
        _ensure_state(engine, keys, optim.get("adam_step", 0.0))
    inner = _inner_optimizer(engine)
    for name, p in params:
        entry = optim["params"][name]
        _set_full(p, weights[name])
        if _wrapped(engine, p):
            _set_hp(p, entry["fp32"].to(p.device))
            for k in keys:
                _set_hp(p, entry[k].to(p.device), k)
        else:
            for k in keys:
                inner.state[p][k] = entry[k].to(device=p.device)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(sched)
        # load_state_dict restores the schedule's position but not the optimizer's current LRs (a
        # scheduler writes them only on step()): without this the first resumed step used the LR of
        # step 0.
        last = getattr(engine.lr_scheduler, "_last_lr", None)
        if last is not None:
            for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, last, strict=True):
                group["lr"] = lr
    step = int(info["step"])
    accum = int(engine.gradient_accumulation_steps())
    engine.global_steps = step
    engine.global_samples = step * int(engine.train_batch_size())
    engine.micro_steps = step * accum
    if rank() == 0:  # steps logged after this checkpoint are trained (and logged) again
        _forget_metrics_after(path.parent.parent / "metrics.jsonl", step)
    barrier()
    return info


def _forget_metrics_after(path: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` records of steps after ``step`` (atomic rewrite; a torn last line of a
    killed run goes too), so a resumed run logs every step exactly once."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
            keep.append(line)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
    os.replace(tmp, path)
