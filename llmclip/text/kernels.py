"""Fused GPU kernels for the stage-1 encoder: used when present, checked for equality when not.

- ``apply_liger(model)``: Liger's Triton RMSNorm, SwiGLU MLP and RoPE on one loaded decoder
  (llama, mistral, qwen2, qwen3) when CUDA and ``liger-kernel`` are present; otherwise a logged
  no-op. Only *this* model instance changes, and each patched module still runs its own PyTorch
  forward on non-CUDA inputs, so a plain model built later in the same process (a test's reference,
  a CPU evaluation) is never silently Liger.
- ``fused_linear_cross_entropy(hidden, weight, target)``: Liger's fused LM-head projection +
  cross-entropy (the [N, V] logits are never materialised) on CUDA; ``None`` elsewhere.
- ``attention_backends(device)``: restricts PyTorch SDPA to its fused flash / memory-efficient
  kernels on CUDA (no silent fall-back to the O(T^2)-memory math kernel); a no-op on the CPU.

``benchmarks/gpu_check.py`` compares each of these with the plain implementation on a GPU;
``tests/text/test_kernels.py`` tests what a CPU can run.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
from collections.abc import Iterator
from types import MethodType
from typing import Any

import torch
import torch.nn as nn

from llmclip.config import ConfigError

log = logging.getLogger(__name__)

# model_type -> (transformers modeling module, Liger's public per-family patch function).
LIGER_FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("transformers.models.llama.modeling_llama", "apply_liger_kernel_to_llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "apply_liger_kernel_to_mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "apply_liger_kernel_to_qwen2"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "apply_liger_kernel_to_qwen3"),
}
KERNEL_CHOICES = ("auto", "none", "liger")

# True while a Liger-patched attention module runs: the family's apply_rotary_pos_emb then uses
# Liger's RoPE (for CUDA tensors); every other attention module keeps the PyTorch RoPE.
_LIGER_ROPE: contextvars.ContextVar[bool] = contextvars.ContextVar("llmclip_liger_rope", default=False)


def liger_status() -> tuple[bool, str]:
    """(usable, reason when not): Liger needs a CUDA device and the ``liger-kernel`` package."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (Liger's kernels are Triton GPU kernels)"
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a triton/transformers version clash
        return False, f"liger-kernel is not importable ({type(e).__name__}: {e}); pip install -e '.[gpu]'"
    return True, ""


def check_kernels_choice(kernels: str, field: str = "kernels") -> None:
    """ConfigError for an unknown choice, or for ``liger`` where Liger cannot run (no fallback)."""
    if kernels not in KERNEL_CHOICES:
        raise ConfigError(f"must be one of {', '.join(KERNEL_CHOICES)}", field)
    if kernels == "liger":
        ok, why = liger_status()
        if not ok:
            raise ConfigError(f"liger needs CUDA and the liger-kernel package: {why}; use kernels: "
                              "auto (Liger when available) or none on this machine", field)


# ------------------------------------------------------------------------------------------------
# Liger RMSNorm / SwiGLU / RoPE on one model instance
# ------------------------------------------------------------------------------------------------


def _device_dispatch_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Bound as a patched module's ``forward``: Liger for CUDA inputs, the class's own otherwise."""
    x = args[0] if args else next(iter(kwargs.values()))
    if x.is_cuda:
        return self._llmclip_liger_forward(self, *args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


def _liger_rope_attention_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Bound as a patched attention module's ``forward``: its RoPE call goes to Liger."""
    token = _LIGER_ROPE.set(True)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _LIGER_ROPE.reset(token)


def _install_rope_dispatch(modeling: Any) -> None:
    """Replace the family's ``apply_rotary_pos_emb`` (looked up as a module global by its attention
    forward) once by a dispatcher: Liger's RoPE inside a patched attention module on CUDA, the
    original function everywhere else (so other models of the family are unaffected)."""
    current = modeling.apply_rotary_pos_emb
    if getattr(current, "_llmclip_original", None) is not None:
        return
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _LIGER_ROPE.get() and q.is_cuda and not args and set(kwargs) <= {"unsqueeze_dim"}:
            return liger_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=kwargs.get("unsqueeze_dim", 1))
        return current(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._llmclip_original = current
    apply_rotary_pos_emb.__doc__ = current.__doc__
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


def _decoder_stack(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)  # under a peft wrapper
    model = get() if callable(get) else model
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def _patch_liger(model: nn.Module, model_type: str, *, rope: bool = True, rms_norm: bool = True,
                 swiglu: bool = True) -> dict[str, Any]:
    """Patch ``model`` in place (no CUDA check; see ``apply_liger``). Returns the report."""
    import liger_kernel.transformers as lt
    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP

    module_name, fn_name = LIGER_FAMILIES[model_type]
    modeling = importlib.import_module(module_name)
    notes: list[str] = []
    act = getattr(model.config, "hidden_act", "silu")
    if swiglu and act not in ("silu", "swish"):
        swiglu = False
        notes.append(f"swiglu skipped: hidden_act {act!r} is not SiLU")
    # Liger's per-family function patches this instance's norms and MLPs, but also rebinds the
    # family's classes and RoPE function module-wide, which would turn every model built later in
    # this process (plain references included) into a Liger model. Keep the instance patch only.
    saved = dict(vars(modeling))
    try:
        getattr(lt, fn_name)(model=model, rope=False, rms_norm=rms_norm, swiglu=swiglu,
                             cross_entropy=False, fused_linear_cross_entropy=False)
    finally:
        for key in [k for k in vars(modeling) if k not in saved]:
            delattr(modeling, key)
        for key, value in saved.items():
            if vars(modeling).get(key) is not value:
                setattr(modeling, key, value)
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    liger_forwards = {LigerRMSNorm.forward: "rms_norm", LigerSwiGLUMLP.forward: "swiglu"}
    for module in model.modules():
        bound = module.__dict__.get("forward")
        kind = liger_forwards.get(getattr(bound, "__func__", None))
        if kind is None:
            continue
        module._llmclip_liger_forward = bound.__func__
        module.forward = MethodType(_device_dispatch_forward, module)
        counts[kind] += 1
    if rope:
        _install_rope_dispatch(modeling)
        for layer in _decoder_stack(model).layers:
            attn = layer.self_attn
            if "forward" not in attn.__dict__:
                attn.forward = MethodType(_liger_rope_attention_forward, attn)
                counts["rope"] += 1
    applied = [k for k in ("rms_norm", "swiglu", "rope") if counts[k]]
    return {"kernels": "liger" if applied else "none", "applied": applied, "modules": counts,
            "model_type": model_type, "reason": "; ".join(notes)}


def apply_liger(model: nn.Module, model_type: str | None = None, *, required: bool = False,
                rope: bool = True, rms_norm: bool = True, swiglu: bool = True) -> dict[str, Any]:
    """Liger's fused RMSNorm, SwiGLU MLP and RoPE on a loaded decoder (``*ForCausalLM`` or the bare
    decoder), before peft wraps it. Returns ``{"kernels", "applied", "modules", "reason"}``.

    Applied when CUDA and liger-kernel are present and ``model_type`` (default: the model's config)
    is llama, mistral, qwen2 or qwen3; otherwise nothing changes and the reason is logged and
    returned, or, with ``required`` (``kernels: liger``), a ConfigError is raised (no fallback).
    Safe with the encoder's bidirectional attention (masks and ``is_causal`` are untouched: only
    RoPE's rotation changes inside attention) and with NF4 / LoRA linears (the SwiGLU forward calls
    the module's own gate/up/down projections; only the SiLU*mul is fused). Logits and the loss
    are never patched. Idempotent.
    """
    done = getattr(model, "_llmclip_kernels", None)
    if done is not None:
        return done
    model_type = model_type or getattr(getattr(model, "config", None), "model_type", None)
    ok, why = liger_status()
    if ok and model_type not in LIGER_FAMILIES:
        ok, why = False, f"no Liger patch for model type {model_type!r} (have {', '.join(LIGER_FAMILIES)})"
    if not ok:
        if required:
            raise ConfigError(f"liger kernels requested but unavailable: {why}", "model.kernels")
        log.info("Liger kernels not applied: %s", why)
        report = {"kernels": "none", "applied": [], "modules": {}, "model_type": model_type,
                  "reason": why}  # fmt: skip
        model._llmclip_kernels = report
        return report
    report = _patch_liger(model, model_type, rope=rope, rms_norm=rms_norm, swiglu=swiglu)
    model._llmclip_kernels = report
    log.info("Liger kernels applied to %s: %s %s%s", model_type, ", ".join(report["applied"]) or "none",
             report["modules"], f" ({report['reason']})" if report["reason"] else "")
    return report


def kernels_of(model: nn.Module) -> dict[str, Any]:
    """The ``apply_liger`` report of ``model`` (or of the model under its peft wrapper)."""
    for m in (model, getattr(model, "get_base_model", lambda: model)()):
        if getattr(m, "_llmclip_kernels", None) is not None:
            return m._llmclip_kernels
    return {"kernels": "none", "applied": [], "modules": {}, "reason": "not applied"}


# ------------------------------------------------------------------------------------------------
# Fused linear cross-entropy (MNTP on GPU)
# ------------------------------------------------------------------------------------------------


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               ignore_index: int = -100) -> torch.Tensor | None:
    """Mean cross-entropy of ``hidden [N, D] @ weight[V, D].T`` against ``target [N]`` with Liger's
    fused kernel (chunked projection, logits never materialised; gradients for ``hidden`` and, when
    it requires grad, ``weight``), or ``None`` when it cannot run here (CPU tensors, no liger-kernel):
    the caller then uses its PyTorch path (e.g. ``chunked_linear_cross_entropy``).

    ``hidden`` is cast to ``weight``'s dtype (logits in that dtype, the softmax in float32, as
    ``F.cross_entropy(lm_head(h).float(), t)`` does; a weight gradient accumulates in float32). ``weight`` must be the whole LM head: under
    ZeRO-3 gather it first (``deepspeed.zero.GatheredParameters``); a 4-bit weight is refused.
    """
    if not (hidden.is_cuda and weight.is_cuda):
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # noqa: BLE001
        log.debug("fused linear cross-entropy unavailable: %s", e)
        return None
    if weight.dim() != 2 or not weight.is_floating_point() or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy needs a floating [V, D] weight matching hidden "
                         f"[N, {hidden.shape[-1]}], got {weight.dtype} {tuple(weight.shape)}")
    # A weight gradient (a trained head) is accumulated over the row chunks in float32, as the
    # chunked PyTorch loss does; a frozen head (LoRA) needs no such buffer.
    accum = torch.float32 if weight.requires_grad and weight.dtype != torch.float32 else None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="mean",
                                            accum_dtype=accum)
    return loss(weight, hidden.to(weight.dtype).contiguous(), target.contiguous()).float()


# ------------------------------------------------------------------------------------------------
# SDPA backends
# ------------------------------------------------------------------------------------------------


def attention_backends(device: torch.device | str | None = None,
                       allow_math: bool = False) -> contextlib.AbstractContextManager:
    """Context for the forward *and* backward (gradient checkpointing recomputes attention there):
    on CUDA, PyTorch SDPA may use only its flash and memory-efficient kernels (flash first; it
    takes no padding mask, so padded batches use memory-efficient); ``allow_math`` adds the math
    kernel as the last resort, else a shape neither fused kernel accepts raises torch's "No
    available kernel" error instead of silently running O(T^2)-memory math. A no-op on the CPU and
    for models that do not call SDPA (``flash_attention_2``, ``eager``)."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type != "cuda":
        return contextlib.nullcontext()
    return _sdpa_backends(allow_math)


@contextlib.contextmanager
def _sdpa_backends(allow_math: bool) -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if allow_math:
        backends.append(SDPBackend.MATH)
    with sdpa_kernel(backends, set_priority=True):
        yield
