"""Stage-2 run files: resolved config, resumable checkpoints (``llmclip.checkpoint``: data only,
``weights_only`` loads, any ZeRO stage, any world size) and the exported final model.

``RUN/final/``: ``model.safetensors`` (every weight, fp32) + ``clip.json`` (model config, image
size, text dim, cache fingerprint, encoder folder, instruction): what ``llmclip.load`` reads. The
encoder folder is recorded relative to ``RUN/final`` (``encoder``) and absolute (``encoder_path``);
``find_encoder`` also looks beside the run for a folder with the training cache's fingerprint, so
a copied or moved run still finds its stage-1 encoder.
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


def encoder_record(encoder_dir: str | None, final: Path) -> dict[str, str | None]:
    """clip.json's ``encoder`` (relative to ``final`` where a relative path exists) and
    ``encoder_path`` (absolute, a fallback for a run moved without its encoder)."""
    if not encoder_dir:
        return {"encoder": None, "encoder_path": None}
    absolute = Path(encoder_dir).resolve()
    try:
        rel = Path(os.path.relpath(absolute, Path(final).resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        rel = str(absolute)
    return {"encoder": rel, "encoder_path": str(absolute)}


# Where ``find_encoder`` looks for an encoder folder by fingerprint, relative to the run folder's
# parents: a stage-1 run beside the stage-2 run (the demo's RUN/stage1/final) or its folder itself.
_BESIDE = ("*/encoder.json", "*/final/encoder.json")


def _fingerprint_or_none(folder: Path) -> str | None:
    try:
        return encoder_fingerprint(str(folder))
    except ConfigError:
        return None


def find_encoder(final: Path, meta: dict[str, Any]) -> tuple[Path | None, list[str]]:
    """The stage-1 encoder folder a finished run (``RUN/final``, its ``clip.json`` as ``meta``)
    was trained against, and the places looked at (for the error when none is found).

    In order: ``encoder`` (relative to ``final``, or an absolute path as older runs wrote),
    ``encoder_path``, then any ``encoder.json`` beside the run (``_BESIDE`` under the run folder,
    its parent and grandparent) whose fingerprint is the training cache's. A recorded folder with
    another fingerprint is passed over: it is not the encoder the model learned from.
    """
    want = meta.get("cache_fingerprint")
    tried: list[str] = []
    seen: set[Path] = set()

    def fits(folder: Path) -> bool:
        folder = folder.resolve()
        if folder in seen:
            return False
        seen.add(folder)
        tried.append(str(folder))
        fp = _fingerprint_or_none(folder)
        return fp is not None and (not want or fp == want)

    for rec in (meta.get("encoder"), meta.get("encoder_path")):
        if isinstance(rec, str) and rec and fits(Path(final) / rec):  # an absolute rec replaces final
            return (Path(final) / rec).resolve(), tried
    if want:
        run = Path(final).resolve().parent
        for base in dict.fromkeys((run, run.parent, run.parent.parent)):
            for pattern in _BESIDE:
                for hit in sorted(base.glob(pattern)):
                    if fits(hit.parent):
                        return hit.parent.resolve(), tried
    return None, tried


def _buffers_file(out: Path, step: int, rank: int) -> Path:
    return out / "checkpoints" / f"buffers-step-{step:06d}-rank{rank}.safetensors"


def module_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Persistent buffers (BatchNorm running statistics, text statistics): not trained, so not in
    ``llmclip.checkpoint``'s files, yet part of what a resumed run must continue from."""
    params = {n for n, _ in module.named_parameters()}
    return {
        k: v.detach().cpu().clone().contiguous()
        for k, v in module.state_dict().items()
        if k not in params
    }


def save(out: Path, step: int, engine: Any, extra: dict[str, Any], keep: int, env: DistEnv) -> Path:
    """A resumable checkpoint (every rank calls): this rank's buffers first (atomic), then the
    trainable state through ``llmclip.checkpoint``; buffers of pruned checkpoints are removed."""
    from safetensors.torch import save_file

    bufs = module_buffers(engine.module)
    if bufs:
        target = _buffers_file(out, step, env.rank)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        save_file(bufs, str(tmp))
        os.replace(tmp, target)
    path = save_checkpoint(out, step, engine, extra, keep=keep)
    if env.is_main:
        live = {p.name for p in (out / "checkpoints").glob("step-*") if p.is_dir()}
        for f in (out / "checkpoints").glob("buffers-step-*.safetensors"):
            if f.name.split("-rank")[0].removeprefix("buffers-") not in live:
                f.unlink(missing_ok=True)
    barrier()
    return path


def load_latest(out: Path, engine: Any, env: DistEnv) -> dict[str, Any] | None:
    """Restore the latest complete checkpoint into ``engine``; its ``state.json`` (None: none yet)."""
    from safetensors.torch import load_file

    path = latest_checkpoint(out)
    if path is None:
        return None
    info = load_checkpoint(path, engine)
    step = int(info["step"])
    bufs = module_buffers(engine.module)
    if bufs:
        f = _buffers_file(out, step, env.rank)
        f = f if f.is_file() else _buffers_file(out, step, 0)  # resumed on more ranks than saved
        if not f.is_file():
            raise ConfigError(
                f"{path} has no buffers file ({f.name}); the checkpoint is incomplete", "run.resume"
            )
        try:
            saved = load_file(str(f))
        except Exception as e:  # noqa: BLE001 - an unreadable file is a bad checkpoint
            raise ConfigError(f"{f}: unreadable: {e}", "run.resume") from None
        if set(saved) != set(bufs):
            raise ConfigError(
                f"{f} does not match this model's buffers; was the config changed?", "run.resume"
            )
        engine.module.load_state_dict(saved, strict=False)
    return info


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
