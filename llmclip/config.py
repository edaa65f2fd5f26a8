"""Typed dataclass configs loaded from YAML, with ``--set a.b=value`` overrides.

Every config in llmclip is a tree of dataclasses. ``load_config`` reads a YAML file, applies
overrides, and validates the result *before any work starts*: unknown keys (with the closest
valid key suggested), wrong types, missing files and contradictory options raise ``ConfigError``,
which the command line turns into a one-line message and exit code 2.

Conventions for config classes:
- one-line docstring under every field (litgpt style), so the YAML recipes are self-explaining;
- a ``validate(self) -> None`` method for ranges and cross-field contradictions; it raises
  ``ConfigError`` naming the key. ``validate`` is called bottom-up on every nested dataclass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import shutil
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
EXIT_CONFIG = 2


class ConfigError(ValueError):
    """A config, CLI argument or input file is invalid. The message names the key or file."""

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(options)})"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where lossless (int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", key)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"must be one of {choices}, got {value!r}", key)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping for section, got {value!r}", key)
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", key)
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", key)
        _, vt = get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true/false, got {value!r}", key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", key)
        if not -(2**63) <= value < 2**63:  # torch, numpy and seeds overflow beyond int64
            raise ConfigError(f"integer out of range, got {value!r}", key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}", key)
        if not math.isfinite(value):  # YAML .nan/.inf: no option means NaN or infinity
            raise ConfigError(f"expected a finite number, got {value!r}", key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", key)
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", key)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly: unknown keys and bad types raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {type(data).__name__}", prefix or None)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise ConfigError("unknown key" + _closest(str(name), sorted(fields)), _join(prefix, str(name)))
        kwargs[name] = _coerce(value, hints[name], _join(prefix, name))
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError("required key is missing", _join(prefix, missing[0]))
    obj = cls(**kwargs)
    return obj


def validate(obj: Any, prefix: str = "") -> None:
    """Run ``validate()`` on every nested dataclass, children first."""
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            validate(child, _join(prefix, f.name))
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            if prefix and e.key and not e.key.startswith(prefix):
                raise ConfigError(str(e).split(": ", 1)[-1], _join(prefix, e.key)) from None
            raise


def to_dict(obj: Any) -> dict[str, Any]:
    """The resolved config as plain data (what the run folder stores as ``config.yaml``)."""
    return dataclasses.asdict(obj)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings; values are parsed as YAML scalars/lists (``lr=1e-4``, ``x=[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse value {raw!r}: {e}", path) from None
        value = _fix_yaml_floats(value)
        node = data
        parts = path.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError("cannot set a sub-key of a non-section value", path)
            node = nxt
        node[parts[-1]] = value
    return data


_YAML_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _fix_yaml_floats(node: Any) -> Any:
    # YAML 1.1 reads "1e-4" (no dot) as a string; users mean a number.
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _YAML_FLOAT.match(node.strip()):
        return float(node)
    return node


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely (``yaml.safe_load``), naming the file on every failure."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return _fix_yaml_floats(data)


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load, override, type-check and validate a config of class ``cls``."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    obj = from_dict(cls, data)
    validate(obj)
    return obj


def require_file(path: str, key: str) -> None:
    """Raise ``ConfigError`` naming ``key`` when ``path`` is set but is not an existing file."""
    if path and not Path(path).exists():
        raise ConfigError(f"file or folder not found: {path}", key)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Name ``path`` and the free space left when writing it fails (disk full, quota, read-only).

    Writers report a full disk obscurely (numpy "N requested and M written", torch "unexpected pos",
    safetensors "I/O error") or not at all; inside this block any write error becomes a
    ``ConfigError`` naming the file, so a command prints one line and exits 2. Callers write to a
    temporary name and rename on success, so the previous complete state stays readable.
    """
    try:
        yield
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"cannot write {path}: {e} ({_free_space(Path(path))})") from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":  # safetensors' I/O errors are plain Exceptions
            raise
        raise ConfigError(f"cannot write {path}: {e} ({_free_space(Path(path))})") from None


def _free_space(path: Path) -> str:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return f"{shutil.disk_usage(p).free} bytes free on its device"
            except OSError:
                break
    return "free space unknown"


def exit_on_config_error(err: ConfigError) -> typing.NoReturn:
    print(f"llmclip: config error: {err}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


# --------------------------------------------------------------------------------------------
# Sections shared by both training stages. Stage-specific top-level configs live beside their
# trainers (``llmclip/text/stage1_config.py``, ``llmclip/clip/stage2.py``) and nest these.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunConfig:
    out_dir: str = "runs/default"
    """Run folder: resolved config, checkpoints, final model, metrics.jsonl, TensorBoard events."""
    seed: int = 0
    """Seed for model init, data order and masking; the same seed gives the same run."""
    log_every: int = 10
    """Log loss/throughput every N optimizer steps (JSON lines + TensorBoard)."""
    save_every: int = 50
    """Write a resumable checkpoint every N optimizer steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep; older ones are deleted after a new one is complete."""
    resume: bool = True
    """Resume from the latest complete checkpoint in ``out_dir`` when one exists."""
    tensorboard: bool = True
    """Write TensorBoard events under ``out_dir/tb``."""
    max_nonfinite_steps: int = 5
    """Stop with an error after this many consecutive steps with a NaN/Inf loss (each is skipped)."""
    collective_timeout_s: int = 600
    """Timeout of collectives: a rank that dies makes the others fail within this, not hang."""

    def validate(self) -> None:
        for name in ("log_every", "keep_checkpoints", "max_nonfinite_steps", "collective_timeout_s"):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", name)
        if self.save_every < 0:
            raise ConfigError("must be >= 0", "save_every")
        if not self.out_dir:
            raise ConfigError("must not be empty", "out_dir")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate of AdamW (torch), reached after warmup."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not applied to norms, biases, logit scale)."""
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to ``lr``."""
    max_steps: int = 100
    """Total optimizer steps; cosine decay ends here."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (DeepSpeed ``gradient_clipping``); 0 disables."""

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"must be > 0, got {self.lr}", "lr")
        if not self.eps > 0:
            raise ConfigError(f"must be > 0, got {self.eps}", "eps")
        if self.weight_decay < 0:
            raise ConfigError("must be >= 0", "weight_decay")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"must be two numbers in [0, 1), got {self.betas}", "betas")
        if self.max_steps < 1:
            raise ConfigError("must be >= 1", "max_steps")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError("must be between 0 and max_steps", "warmup_steps")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("must be in [0, 1]", "min_lr_ratio")
        if self.grad_clip < 0:
            raise ConfigError("must be >= 0", "grad_clip")


def lr_factor(step: int, optim: OptimConfig) -> float:
    """The one learning-rate schedule of both stages, as a factor of ``optim.lr``: linear warmup to 1
    over ``warmup_steps``, then cosine to ``min_lr_ratio`` at ``max_steps``."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    span = max(1, optim.max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclasses.dataclass
class DeepSpeedSection:
    config: str = "ds_configs/cpu_zero2.json"
    """DeepSpeed JSON with every value explicit; batch sizes and clip are filled from this config."""
    zero_stage: int | None = None
    """Override the JSON's ZeRO stage (0-3); null keeps the file's value."""
    micro_batch_size: int = 8
    """Samples per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    precision: Literal["auto", "bf16", "fp32", "bf16-autocast"] = "auto"
    """``auto`` = bf16 on CUDA; on a CPU with AMX or AVX512-BF16 bf16-autocast, else fp32."""
    autocast_attention: Literal["fp32", "bf16"] = "fp32"
    """Attention kernel's precision under bf16-autocast on a CPU (fp32: faster there, see text/attention.py)."""
    zero3_leaf: Literal["auto", "lora", "layer", "none"] = "auto"
    """Stage 1 ZeRO-3 fetch unit: ``layer`` = each decoder layer, ``lora`` = each LoRA linear, ``none`` = every module, ``auto`` = layer at length_buckets 1."""

    def validate(self) -> None:
        if not self.config:
            raise ConfigError("must name a DeepSpeed JSON file", "config")
        require_file(self.config, "config")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("must be 0, 1, 2 or 3", "zero_stage")
        if self.micro_batch_size < 1:
            raise ConfigError("must be >= 1", "micro_batch_size")
        if self.grad_accum < 1:
            raise ConfigError("must be >= 1", "grad_accum")
        if self.autocast_attention not in ("fp32", "bf16"):
            raise ConfigError(f"must be fp32 or bf16, got {self.autocast_attention!r}", "autocast_attention")
        if self.zero3_leaf not in ("auto", "lora", "layer", "none"):
            raise ConfigError(f"must be auto, lora, layer or none, got {self.zero3_leaf!r}", "zero3_leaf")
        if self.precision not in ("auto", "bf16", "fp32", "bf16-autocast"):
            raise ConfigError(f"must be auto, bf16, fp32 or bf16-autocast, got {self.precision!r}",
                              "precision")
