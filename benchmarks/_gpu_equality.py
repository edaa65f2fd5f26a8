"""Checks 1 and 2 of ``gpu_check.py``: genuinely different implementations compared for equality.

1. attention: eager vs SDPA forced to each of its kernels (math, flash, memory-efficient) vs
   flash_attention_2 when installed, on a bidirectional tiny Llama, padded and unpadded;
2. kernels: Liger's RMSNorm / SwiGLU / RoPE-patched model vs the plain one (hidden states, loss,
   every gradient), and Liger's fused linear cross-entropy and llmclip's chunked one vs
   ``F.cross_entropy``.

A kernel that cannot run here is recorded as ``skipped (reason)``, never as passed; every pair
records the two implementations, the difference and the tolerance.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402, F401
import torch  # noqa: E402

GiB = 1024**3
Env = Any  # gpu_check.Env (device, dtype, sizes); typed loosely to avoid an import cycle


# ------------------------------------------------------------------------------------------------
# 1. attention
# ------------------------------------------------------------------------------------------------


def tiny_llama_dir(work: Path, hidden: int, layers: int) -> Path:
    from llmclip.text.sources import TinyLlamaSpec, build_tiny_llama

    spec = TinyLlamaSpec(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(2, hidden // 64),
        num_key_value_heads=max(1, hidden // 128), intermediate_size=hidden * 2,
    )  # fmt: skip
    return build_tiny_llama(spec, str(work / "models"))


PASSED, FAILED = "passed", "failed"


def skipped(reason: str) -> str:
    return f"skipped ({reason})"


def rel_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """(max |a - b|, that over max |b|) on the rows selected by ``mask``; b is the reference."""
    a, b = a.detach().float(), b.detach().float()
    if mask is not None:
        a, b = a[mask], b[mask]
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return diff, diff / max(b.abs().max().item() if b.numel() else 0.0, 1e-12)


def pair(a: str, b: str, diff: float, rel: float, tol: float, **extra: Any) -> dict[str, Any]:
    """One comparison of two implementations (``b`` = the reference) against a relative tolerance."""
    return {"compared": [a, b], "max_abs_diff": diff, "rel_diff": rel, "tolerance": tol,
            "status": PASSED if rel <= tol else FAILED, **extra}  # fmt: skip


def verdict_of(pairs: list[dict[str, Any]]) -> bool | None:
    """False if any pair failed; None if none ran (all skipped: not a pass); else True."""
    if any(p["status"] == FAILED for p in pairs):
        return False
    return True if any(p["status"] == PASSED for p in pairs) else None


def bf16_tolerance(noise: float, floor: float) -> float:
    """bf16 tolerance: twice the rounding noise of the plain bf16 path (its distance from fp32), at
    least ``floor``. A fused kernel accumulates in fp32, so it is no further from the bf16 reference
    than bf16 itself is from fp32; a real bug (a wrong mask, a wrong rotation) is far above that."""
    return max(floor, 2.0 * noise)


def check_attention(env: Env, work: Path) -> dict[str, Any]:
    """eager (the reference: matmul + softmax in PyTorch) vs SDPA's math, flash and memory-efficient
    kernels (each forced alone with ``sdpa_kernel``, so a refused kernel raises instead of silently
    falling back) vs flash-attn's ``flash_attention_2``: bidirectional hidden states of the same
    weights, on an unpadded and a padded batch. A negative control (causal vs bidirectional eager)
    shows the comparison detects a real difference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.utils import is_flash_attn_2_available

    from llmclip.text.attention import make_bidirectional, make_causal
    from llmclip.text.encoder import LLMEncoder
    from llmclip.text.model_config import ModelConfig

    cuda = env.device.type == "cuda"
    folder = tiny_llama_dir(work, 64 if env.smoke else 1024, 2 if env.smoke else 4)
    flash_pkg = cuda and is_flash_attn_2_available()
    texts = [
        "Small left pleural effusion. No pneumothorax. Heart size is normal.",
        "No acute cardiopulmonary abnormality.",
        "Interval increase in right lower lobe opacity, concerning for pneumonia.",
    ]

    def build(impl: str, dtype: torch.dtype) -> Any:
        cfg = ModelConfig(source=str(folder), attention=impl, max_length=64, kernels="none")
        return LLMEncoder.build(cfg, dtype, lora=False).to(env.device).eval()

    encs = {"eager": build("eager", env.dtype), "sdpa": build("sdpa", env.dtype)}
    if flash_pkg:
        encs["flash_attention_2"] = build("flash_attention_2", env.dtype)
    result: dict[str, Any] = {
        "flash_attn_package": flash_pkg, "dtype": str(env.dtype).replace("torch.", ""),
        "reference": "eager", "selected": {k: e.base_model.config._attn_implementation
                                           for k, e in encs.items()},
    }  # fmt: skip
    padded = encs["eager"].tokenize(texts, device=env.device)
    width = int(padded["attention_mask"].sum(1).min())
    unpadded = {k: v[:, :width] for k, v in padded.items()}
    batches = {"unpadded": unpadded, "padded": padded}

    def states(enc, batch, backend=None, ids=None):
        ids = batch["input_ids"] if ids is None else ids
        ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return enc.hidden_states(ids, batch["attention_mask"]).float()

    # implementation name -> (encoder, forced SDPA backend, why it cannot run here or "")
    impls: dict[str, tuple[Any, Any, str]] = {
        "sdpa-math": (encs["sdpa"], SDPBackend.MATH, ""),
        "sdpa-flash": (encs["sdpa"], SDPBackend.FLASH_ATTENTION, ""),
        "sdpa-efficient": (encs["sdpa"], SDPBackend.EFFICIENT_ATTENTION,
                           "" if cuda else "CUDA-only kernel"),
        "flash_attention_2": (encs.get("flash_attention_2"), None,
                              "" if flash_pkg else ("flash-attn package not installed" if cuda
                                                    else "CUDA-only package")),
    }  # fmt: skip
    tol = 1e-4 if env.dtype == torch.float32 else None
    refs = {name: states(encs["eager"], b) for name, b in batches.items()}
    if tol is None:  # bf16: calibrate on the eager path's own rounding noise (vs fp32 eager)
        eager32 = build("eager", torch.float32)
        noise = max(rel_diff(refs[n], states(eager32, b), b["attention_mask"].bool())[1]
                    for n, b in batches.items())  # fmt: skip
        del eager32
        tol = bf16_tolerance(noise, 1e-2)
        result["bf16_noise_vs_fp32"] = noise
    result["tolerance"] = tol
    pairs: list[dict[str, Any]] = []
    # (implementation, batch) pairs that must run: on CUDA training's unpadded buckets take flash
    # and padded ones memory-efficient; on the CPU the math and flash kernels take both.
    must_run = ({("sdpa-math", "unpadded"), ("sdpa-math", "padded"), ("sdpa-flash", "unpadded"),
                 ("sdpa-efficient", "padded")} if cuda else
                {(i, b) for i in ("sdpa-math", "sdpa-flash") for b in batches})  # fmt: skip
    for impl, (enc, backend, why) in impls.items():
        for bname, batch in batches.items():
            entry = {"compared": [impl, "eager"], "batch": bname}
            if why:
                pairs.append({**entry, "status": skipped(why)})
                continue
            try:
                out = states(enc, batch, backend)
            except RuntimeError as e:  # the forced kernel refused this input
                msg = " ".join(str(e).split())[:200]
                if (impl, bname) in must_run:  # the input this kernel serves in training: a failure
                    pairs.append({**entry, "status": FAILED, "error": f"kernel refused: {msg}"})
                else:  # e.g. torch's flash kernel takes no mask; efficient may refuse GQA unmasked
                    pairs.append({**entry, "status": skipped(f"torch refused this input: {msg}")})
                continue
            diff, rel = rel_diff(out, refs[bname], batch["attention_mask"].bool())
            pairs.append({**pair(impl, "eager", diff, rel, tol), "batch": bname})
    result["pairs"] = pairs

    # Each implementation on its own: bidirectional (the first token sees a change at the last
    # real token of row 0) and padding masked (other pad ids change nothing on real tokens).
    props: dict[str, Any] = {}
    ids, attn = padded["input_ids"], padded["attention_mask"]
    last = int(attn[0].sum()) - 1
    flipped = ids.clone()
    flipped[0, last] = (flipped[0, last] + 7) % encs["eager"].tokenizer.vocab_size
    repadded = torch.where(attn.bool(), ids, torch.full_like(ids, 5))
    for impl, enc, backend in [("eager", encs["eager"], None)] + [
            (i, e, bk) for i, (e, bk, why) in impls.items() if not why]:  # fmt: skip
        batch = padded if (impl, "padded") in must_run or impl in ("eager", "flash_attention_2") \
            else unpadded
        try:
            base = states(enc, batch, backend)
            probe_ids = flipped[:, : batch["input_ids"].shape[1]]
            if batch is unpadded:  # row 0's last token inside the unpadded width
                probe_ids = batch["input_ids"].clone()
                probe_ids[0, -1] = (probe_ids[0, -1] + 7) % enc.tokenizer.vocab_size
            moved = (states(enc, batch, backend, probe_ids)[0, 0] - base[0, 0]).abs().max().item()
            entry: dict[str, Any] = {"first_token_change_from_last_token": moved,
                                     "bidirectional": moved > 1e-4}
            if batch is padded:
                leak = (states(enc, batch, backend, repadded) - base)[attn.bool()].abs().max().item()
                entry.update(pad_leak=leak, padding_masked=leak < 1e-2)
            else:
                entry["padding_masked"] = skipped("no attention mask support; unpadded batch only")
        except RuntimeError as e:
            entry = {"status": skipped(" ".join(str(e).split())[:160])}
        props[impl] = entry
    result["implementations"] = props

    # Negative control: the same comparison must see causal vs bidirectional as far apart.
    eager = encs["eager"]
    make_causal(eager.base_model)
    causal = states(eager, padded)
    make_bidirectional(eager.base_model)
    _, rel = rel_diff(causal, refs["padded"], attn.bool())
    result["control"] = {"compared": ["eager causal", "eager"], "rel_diff": rel,
                         "must_exceed": 10 * tol,
                         "status": PASSED if rel > 10 * tol else FAILED}  # fmt: skip
    props_ok = all(v.get("bidirectional", True) and v.get("padding_masked", True) is not False
                   for v in props.values())  # fmt: skip
    verdict = verdict_of(pairs + [result["control"]])
    result["ok"] = bool(verdict) and props_ok
    result["summary"] = [f"{p['compared'][0]} vs {p['compared'][1]} ({p.get('batch', '')}): "
                         + (f"rel {p['rel_diff']:.2e} <= {p['tolerance']:.0e}: " if "rel_diff" in p else "")
                         + p["status"] + (f" [{p['error']}]" if "error" in p else "")
                         for p in pairs]  # fmt: skip
    return result


# ------------------------------------------------------------------------------------------------
# 2. Liger kernels and the fused linear cross-entropy
# ------------------------------------------------------------------------------------------------


def _mntp_like_loss(enc: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and next-token cross-entropy over the real tokens (exercises the LM head)."""
    import torch.nn.functional as F

    h = enc.hidden_states(batch["input_ids"], batch["attention_mask"])
    sel = batch["attention_mask"][:, 1:].bool()
    logits = enc.lm_head(h[:, :-1][sel]).float()
    return h, F.cross_entropy(logits, batch["input_ids"][:, 1:][sel])


def _liger_run(env: Env, folder: Path, dtype: torch.dtype, nf4: bool, kernels: str) -> dict[str, Any]:
    """One forward + backward of the tiny model: hidden states, loss, every gradient, the kernels
    applied. ``kernels``: ``none``, ``liger`` (through ``LLMEncoder.build``) or ``dry-run`` (CPU:
    the patch plumbing applied without the CUDA gate; CPU inputs then run the plain code)."""
    from llmclip.text.encoder import LLMEncoder
    from llmclip.text.kernels import _patch_liger, kernels_of
    from llmclip.text.model_config import LoraSection, ModelConfig

    texts = [
        "Small left pleural effusion. No pneumothorax. Heart size is normal.",
        "No acute cardiopulmonary abnormality.",
        "Interval increase in right lower lobe opacity, concerning for pneumonia. " * 3,
    ]
    torch.manual_seed(0)  # the same LoRA initialisation on every run
    cfg = ModelConfig(source=str(folder), attention="sdpa", max_length=96,
                      kernels="liger" if kernels == "liger" else "none",
                      quantization="nf4" if nf4 else "none",
                      lora=LoraSection(r=8, alpha=16, dropout=0.0))  # fmt: skip
    enc = LLMEncoder.build(cfg, dtype, lora=nf4)
    if next(enc.lm.parameters()).device != env.device:
        enc.lm.to(env.device)
    if kernels == "dry-run":
        _patch_liger(enc.base_model, "llama")
        enc.base_model._llmclip_kernels = {"kernels": "dry-run", "applied": []}
    if not nf4:
        enc.lm.requires_grad_(True)
    enc.train()
    batch = enc.tokenize(texts, device=env.device)
    h, loss = _mntp_like_loss(enc, batch)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in enc.lm.named_parameters()
             if p.grad is not None}  # fmt: skip
    out = {"h": h.detach().float(), "loss": loss.detach().float(), "grads": grads,
           "mask": batch["attention_mask"].bool(), "report": kernels_of(enc.lm)}  # fmt: skip
    del enc
    return out


def _run_diffs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """hidden / loss / worst-gradient (max abs, relative) differences of run ``a`` from ``b``."""
    worst = ("", 0.0, 0.0)
    for n, g in b["grads"].items():
        if n not in a["grads"]:
            return {"error": f"gradient of {n} missing on one side"}
        d, r = rel_diff(a["grads"][n], g)
        if r >= worst[2]:
            worst = (n, d, r)
    return {"hidden": rel_diff(a["h"], b["h"], b["mask"]), "loss": rel_diff(a["loss"], b["loss"]),
            "grad": worst[1:], "worst_param": worst[0], "grads_compared": len(b["grads"])}  # fmt: skip


def _ce_pair(env: Env, dtype: torch.dtype, impl: str) -> dict[str, Any]:
    """Loss and gradients of one linear cross-entropy implementation vs ``F.cross_entropy``."""
    import torch.nn.functional as F

    from llmclip.text import objectives
    from llmclip.text.kernels import fused_linear_cross_entropy

    n, d, v = (48, 64, 1000) if env.smoke else (2048, 4096, 128256)
    gen = torch.Generator().manual_seed(0)
    hidden0 = (torch.randn(n, d, generator=gen)).to(env.device, dtype)
    weight0 = (torch.randn(v, d, generator=gen) * d**-0.5).to(env.device, dtype)
    target = torch.randint(0, v, (n,), generator=gen).to(env.device)
    out = {}
    for name in ("plain", impl):
        hidden = hidden0.clone().requires_grad_(True)
        weight = weight0.clone().requires_grad_(True)
        env.reset_peak()
        if name == "plain":
            loss = F.cross_entropy((hidden @ weight.t()).float(), target)
        elif name == "liger":
            loss = fused_linear_cross_entropy(hidden, weight, target)
        else:
            loss = objectives.chunked_linear_cross_entropy(hidden, weight, target, max(1, n // 4))
        loss.backward()
        out[name] = (loss.detach().float(), hidden.grad.float(), weight.grad.float(),
                     env.peak_gib() if env.device.type == "cuda" else None)
    (la, ha, wa, ma), (lb, hb, wb, mb) = out[impl], out["plain"]
    return {"loss": rel_diff(la, lb), "grad_hidden": rel_diff(ha, hb), "grad_weight": rel_diff(wa, wb),
            "shape": [n, d, v], "peak_gib": {impl: ma, "plain": mb}}  # fmt: skip


def check_kernels(env: Env, work: Path) -> dict[str, Any]:
    """Liger's RMSNorm + SwiGLU + RoPE (applied by ``LLMEncoder.build(kernels=liger)``) vs the plain
    model of the same weights, fp32 (strict), bf16 and NF4 + LoRA (bf16, calibrated on bf16's own
    noise): hidden states, loss, every gradient. Liger's fused linear cross-entropy and the chunked
    MNTP cross-entropy vs plain ``F.cross_entropy``: loss and both gradients. Liger needs CUDA: on the
    CPU smoke its comparisons are skipped (the patch plumbing still runs, recorded as a dry run)."""
    from llmclip.text import objectives
    from llmclip.text.kernels import liger_status

    cuda = env.device.type == "cuda"
    ok, why = liger_status()
    folder = tiny_llama_dir(work, 64 if env.smoke else 1024, 2 if env.smoke else 4)
    result: dict[str, Any] = {"liger_available": ok, "liger_reason": why}
    with contextlib.suppress(Exception):
        import importlib.metadata as md

        result["liger_kernel_version"] = md.version("liger-kernel")
    pairs: list[dict[str, Any]] = []
    variants = [("fp32", torch.float32, False)]
    variants += ([("bf16", torch.bfloat16, False), ("nf4-bf16", torch.bfloat16, True)] if cuda
                 else [("nf4-fp32", torch.float32, True)])  # fmt: skip
    plain: dict[str, Any] = {}
    for label, dtype, nf4 in variants:
        name, ref_name = f"liger-{label}", f"plain-{label}"
        if not ok and (cuda or importlib.util.find_spec("liger_kernel") is None):
            pairs.append({"compared": [name, ref_name], "status": skipped(why)})
            continue
        try:
            plain[label] = _liger_run(env, folder, dtype, nf4, "none")
            lig = _liger_run(env, folder, dtype, nf4, "liger" if ok else "dry-run")
        except Exception as e:  # noqa: BLE001 - recorded, and fails the check
            pairs.append({"compared": [name, ref_name], "status": FAILED,
                          "error": f"{type(e).__name__}: {e}"[:400]})  # fmt: skip
            continue
        diffs = _run_diffs(lig, plain[label])
        if not ok:
            pairs.append({"compared": [name, ref_name], "status": skipped(why),
                          "dry_run_same_code_both_sides": diffs})  # fmt: skip
            continue
        if "error" in diffs or not lig["report"].get("applied"):
            pairs.append({"compared": [name, ref_name], "status": FAILED,
                          "error": diffs.get("error") or f"Liger not applied: {lig['report']}"})
            continue
        if dtype == torch.float32:
            tols = {"hidden": 1e-4, "loss": 1e-5, "grad": 1e-3}
        else:  # plain bf16's own distance from plain fp32 sets the noise floor
            noise = _run_diffs(plain["bf16"], plain["fp32"]) if "fp32" in plain else {}
            if "hidden" not in noise:
                noise = {"hidden": (0, 0.0), "loss": (0, 0.0), "grad": (0, 0.0)}
            result["bf16_noise_vs_fp32"] = {k: noise[k][1] for k in ("hidden", "loss", "grad")}
            tols = {"hidden": bf16_tolerance(noise["hidden"][1], 2e-2),
                    "loss": bf16_tolerance(noise["loss"][1], 5e-3),
                    "grad": bf16_tolerance(noise["grad"][1], 5e-2)}  # fmt: skip
        for what in ("hidden", "loss", "grad"):
            extra = {"worst_param": diffs["worst_param"]} if what == "grad" else {}
            pairs.append(pair(name, ref_name, *diffs[what], tols[what], quantity=what, **extra))
        pairs[-1]["kernels_applied"] = lig["report"]
    # Linear cross-entropy: Liger fused (CUDA) and chunked (any device) vs F.cross_entropy.
    ce_impls = [("liger-flce", "liger", ok, why),
                ("chunked-ce", "chunked", hasattr(objectives, "chunked_linear_cross_entropy"),
                 "objectives.chunked_linear_cross_entropy not present")]  # fmt: skip
    for label, impl, available, reason in ce_impls:
        for dname, dtype in [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if cuda else []):
            name = f"{label}-{dname}"
            if not available:
                pairs.append({"compared": [name, f"F.cross_entropy-{dname}"], "status": skipped(reason)})
                continue
            try:
                res = _ce_pair(env, dtype, impl)
            except Exception as e:  # noqa: BLE001
                pairs.append({"compared": [name, f"F.cross_entropy-{dname}"], "status": FAILED,
                              "error": f"{type(e).__name__}: {e}"[:400]})  # fmt: skip
                continue
            tols = ({"loss": 1e-5, "grad_hidden": 1e-4, "grad_weight": 1e-4} if dtype == torch.float32
                    else {"loss": 2e-3, "grad_hidden": 3e-2, "grad_weight": 3e-2})  # fmt: skip
            for what, tol in tols.items():
                pairs.append(pair(name, f"F.cross_entropy-{dname}", *res[what], tol, quantity=what,
                                  shape=res["shape"], peak_gib=res["peak_gib"]))  # fmt: skip
    result["pairs"] = pairs
    result["ok"] = verdict_of(pairs)
    result["summary"] = [f"{p['compared'][0]} vs {p['compared'][1]}"
                         + (f" {p['quantity']}: rel {p['rel_diff']:.2e} <= {p['tolerance']:.0e}"
                            if "rel_diff" in p else "") + f": {p['status']}"
                         + (f" [{p['error']}]" if "error" in p else "") for p in pairs]  # fmt: skip
    return result


