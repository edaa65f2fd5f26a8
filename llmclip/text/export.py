"""The encoder dir (``RUN/final/``): what stage 1 hands to the cache builder.

    encoder.json        format, pooling, max_length, instruction(s), dim, dtype, base model, fingerprint
    model/              the decoder with LoRA merged, safetensors, config marked non-causal (AutoModel)
    tokenizer/          the tokenizer
    pooler.safetensors  trainable pooler weights (standardize statistics, latent-attention pooler)
    adapter/            the LoRA adapter alone (peft format), when the run used LoRA
    README.md           model card (``model_card.py``): base, layers, data, recipe, held-out metrics, limits
    modules.json, config_sentence_transformers.json, 1_Pooling/, 2_Dense/, model/ tokenizer
                        Sentence Transformers and plain transformers loading (``st_export.py``)

The fingerprint is a sha256 over every weight file's bytes plus pooling, max length and instruction:
two dirs with the same fingerprint embed every report identically, so the cache builder can record it
and stage 2 can refuse embeddings made by another encoder. The portable files are not hashed (they
are derived from what is), so ``llmclip export`` rewrites them without changing the fingerprint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn

from llmclip.config import ConfigError
from llmclip.text.encoder import ENCODER_FORMAT

log = logging.getLogger(__name__)


def compute_fingerprint(enc_dir: Path, meta: dict[str, Any]) -> str:
    """sha256 over weight files (sorted by relative path) and the settings that change embeddings."""
    h = hashlib.sha256()
    files = sorted(p for p in (enc_dir / meta.get("model_dir", "model")).rglob("*.safetensors"))
    if meta.get("pooler_file"):
        files.append(enc_dir / meta["pooler_file"])
    for f in files:
        h.update(str(f.relative_to(enc_dir)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    settings = {k: meta.get(k) for k in ("pooling", "max_length", "instruction", "pooler_args")}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def save_encoder_dir(out: str | Path, decoder: nn.Module, tokenizer: Any, pooler: nn.Module, *,
                     pooling: str, max_length: int, dtype: str, instruction: str | None = None,
                     instructions: dict[str, str] | None = None, pooler_args: dict[str, Any] | None = None,
                     adapter_dir: Path | None = None, extra: dict[str, Any] | None = None,
                     run_dir: Path | None = None) -> Path:
    """Write an encoder dir atomically (temp folder, then rename) and return its path.

    ``decoder`` is a plain transformers model (LoRA already merged), e.g. ``LlamaModel``. ``run_dir``
    (the stage-1 run) feeds the model card its data and recipe.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    decoder.config.is_causal = False
    decoder.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    pooler_state = {k: v.detach().cpu().contiguous() for k, v in pooler.state_dict().items()}
    meta: dict[str, Any] = {
        "format": ENCODER_FORMAT,
        "model_dir": "model",
        "tokenizer_dir": "tokenizer",
        "pooling": pooling,
        "pooler_args": dict(pooler_args or {}),
        "pooler_file": "pooler.safetensors" if pooler_state else None,
        "max_length": int(max_length),
        "instruction": instruction,
        "instructions": dict(instructions or {}),
        "dim": int(decoder.config.hidden_size),
        "dtype": dtype,
        "layers": int(decoder.config.num_hidden_layers),
        **(extra or {}),
    }
    if pooler_state:
        save_file(pooler_state, str(tmp / "pooler.safetensors"), metadata={"format": "pt"})
    if adapter_dir is not None:
        shutil.copytree(adapter_dir, tmp / "adapter")
        meta["adapter_dir"] = "adapter"
    meta["fingerprint"] = compute_fingerprint(tmp, meta)
    try:
        meta["export"] = write_export(tmp, meta, where=out, origin=out, run_dir=run_dir)
    except Exception as e:  # noqa: BLE001 - the encoder must survive a failed extra; `llmclip export` redoes it
        from llmclip.text.st_export import remove_st_files

        log.warning("%s: portable files not written (%s: %s); rerun `llmclip export %s`", out,
                    type(e).__name__, e, out)
        remove_st_files(tmp)  # none half-written: ST would load them and embed differently
        meta["export"] = {"error": f"{type(e).__name__}: {e}"}
    (tmp / "encoder.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def export_final(module: nn.Module, cfg: Any, out: str | Path, dtype: Any) -> Path | None:
    """Write ``RUN/final/`` from a trained ``Stage1Module`` (every rank calls; rank 0 writes).

    The trained tensors (LoRA, pooler) are gathered whole; rank 0 then rebuilds the same encoder in
    plain ``dtype`` (never 4-bit: merging LoRA into NF4 weights would round it away), loads them,
    saves the adapter alone, merges it, and saves the decoder + pooler + tokenizer + encoder.json.
    """
    import dataclasses

    import torch

    from llmclip.checkpoint import full_parameter, trainable_parameters
    from llmclip.distributed import rank
    from llmclip.text.encoder import LLMEncoder
    from llmclip.text.model_config import pooler_args

    weights = {name: full_parameter(p) for name, p in trainable_parameters(module)}
    if rank() != 0:
        return None
    plain = dataclasses.replace(cfg.model, quantization="none", gradient_checkpointing=False)
    enc = LLMEncoder.build(plain, dtype)
    fresh = dict(nn.ModuleDict({"encoder": enc}).named_parameters())
    missing = sorted(set(weights) - set(fresh))
    if missing:
        raise RuntimeError(f"export: trained parameters not found in the rebuilt encoder: {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            fresh[name].copy_(value.to(fresh[name].dtype))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".adapter-") as tmp:
        adapter = None
        lm = enc.lm
        if hasattr(lm, "merge_and_unload"):
            adapter = Path(tmp) / "adapter"
            lm.save_pretrained(adapter)
            lm = lm.merge_and_unload()
        decoder = getattr(lm, lm.base_model_prefix, lm)
        extra = {"stage": 1, "base_model": cfg.model.source, "keep_layers": cfg.model.keep_layers,
                 "layers": int(decoder.config.num_hidden_layers), "base_layers": enc.meta.get("base_layers"),
                 "trained_steps": cfg.optim.max_steps}
        return save_encoder_dir(
            out, decoder, enc.tokenizer, enc.pooler, pooling=cfg.model.pooling,
            max_length=cfg.model.max_length, dtype=str(dtype).replace("torch.", ""), instruction=None,
            instructions=dict(cfg.stage1.instructions), pooler_args=pooler_args(cfg.model),
            adapter_dir=adapter, extra=extra, run_dir=out.parent)


# ---------------------------------------------------------------- portable files, `llmclip export`
def write_export(enc_dir: Path, meta: dict[str, Any], *, where: Path, origin: Path,
                 run_dir: Path | None, metrics_file: Path | None = None) -> dict[str, Any]:
    """Write the Sentence Transformers / plain-transformers files and the model card into
    ``enc_dir`` (``where``: its final location; ``origin``: where held-out metrics are looked for).
    Returns what encoder.json records under ``export`` (not hashed)."""
    from llmclip.text.model_card import adapter_status, recorded_base_layers, write_model_card
    from llmclip.text.st_export import write_st_files

    info = write_st_files(enc_dir, meta)
    known = {**meta, "base_layers": recorded_base_layers(enc_dir, meta)}
    applies, why = adapter_status(known)
    info.update(adapter_applies_to_base=applies, adapter_note=why)
    used = write_model_card(enc_dir, known, info, where=where, origin=origin, run_dir=run_dir,
                            metrics_file=metrics_file)
    info.update(model_card="README.md", heldout_metrics=str(used) if used else None)
    return info


def locate_encoder_dir(path: Path) -> tuple[Path, Path | None]:
    """(encoder dir, stage-1 run folder or None) for a run folder or an encoder dir."""
    if (path / "encoder.json").is_file():
        return path, path.parent if (path.parent / "config.yaml").is_file() else None
    if (path / "final" / "encoder.json").is_file():
        return path / "final", path
    raise ConfigError(f"{path}: no encoder.json here nor in {path / 'final'} (expected a stage-1 run or an "
                      "encoder dir)", "RUN")


def export_encoder(path: str | Path, out: str | Path | None = None,
                   metrics_file: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """(Re)write the portable files of an existing encoder dir, in place or into a copy at ``out``,
    without retraining. Returns (the dir written, its ``export`` record)."""
    enc_dir, run_dir = locate_encoder_dir(Path(path))
    meta_path = enc_dir / "encoder.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{meta_path}: not valid JSON: {e}", "encoder") from None
    if meta.get("format") != ENCODER_FORMAT:
        raise ConfigError(f"{meta_path}: format {meta.get('format')!r}, expected {ENCODER_FORMAT}", "format")
    # The files written here are derived from the weights: refuse weights that are not the ones the
    # fingerprint (and every cache built with it) names.
    if compute_fingerprint(enc_dir, meta) != meta.get("fingerprint"):
        raise ConfigError(f"{meta_path}: the weights do not match the recorded fingerprint", "fingerprint")
    target = enc_dir
    if out is not None:
        out = Path(out)
        if out.exists():
            raise ConfigError(f"{out} already exists; name a new folder, or leave out --out to export in place",
                              "--out")
        out.parent.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)) / "enc"
        shutil.copytree(enc_dir, target)
    try:
        meta["export"] = write_export(target, meta, where=out or enc_dir, origin=enc_dir, run_dir=run_dir,
                                      metrics_file=Path(metrics_file) if metrics_file else None)
        tmp_meta = target / f".encoder.json.{os.getpid()}.tmp"
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp_meta, target / "encoder.json")
        if out is not None:
            os.replace(target, out)
    finally:
        if out is not None:
            shutil.rmtree(target.parent, ignore_errors=True)
    return (out or enc_dir), meta["export"]


def _cmd_export(args: argparse.Namespace) -> int:
    written, info = export_encoder(args.run, args.out, args.metrics)
    st = "yes" if info.get("sentence_transformers") else f"no ({info.get('sentence_transformers_note')})"
    print(f"exported {written}: model card README.md, Sentence Transformers: {st}, held-out metrics: "
          f"{info.get('heldout_metrics') or 'none found'}")
    return 0


def register(sub: Any) -> None:
    """``llmclip export RUN [--out DIR] [--metrics FILE]``."""
    p = sub.add_parser("export", help="(re)write an encoder dir's model card and Sentence Transformers / "
                                      "plain transformers files, without retraining")
    p.add_argument("run", metavar="RUN", help="stage-1 run folder (uses RUN/final) or an encoder dir")
    p.add_argument("--out", default=None, help="write an exported copy here instead of in place")
    p.add_argument("--metrics", default=None,
                   help="`llmclip eval text` JSON for the card (default: one found beside the run whose "
                        "fingerprint matches)")
    p.set_defaults(func=_cmd_export)
