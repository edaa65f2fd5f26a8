"""The Python side of ``benchmarks/gpu_check.sh``: four GPU checks, one JSON.

    bash benchmarks/gpu_check.sh                 # one CUDA GPU (H200: < 10 minutes, 9 min limit)
    python benchmarks/gpu_check.py --cpu-smoke   # the same code on tiny sizes, on a CPU

Every comparison is between genuinely different implementations, records the pair it compared
(``"compared": [impl, reference]``), the max difference and the tolerance, and is ``passed``,
``failed`` or ``skipped (reason)`` (an implementation that cannot run here is never a pass).

1. ``attention``: bidirectional hidden states of one tiny Llama's weights, eager (reference) vs
   SDPA forced to each kernel alone with ``sdpa_kernel`` (math; flash, unpadded batch on CUDA as it
   takes no mask; memory-efficient, CUDA) vs flash-attn's ``flash_attention_2`` (when installed), on
   an unpadded and a padded batch; each is also bidirectional and masks padding. bf16 tolerance =
   max(1e-2, 2 x eager-bf16's own distance from eager-fp32); a negative control (causal vs
   bidirectional) must exceed 10 x the tolerance, so the comparison can fail.
2. ``kernels``: the model patched with Liger's RMSNorm + SwiGLU + RoPE (``kernels: liger``) vs the
   plain one, fp32 (strict), bf16 and NF4 + LoRA: hidden states, loss, every gradient; Liger's fused
   linear cross-entropy and ``objectives.chunked_linear_cross_entropy`` vs ``F.cross_entropy`` at the
   llama3-8b head size (loss, both gradients). On the CPU smoke Liger is skipped (dry run recorded).
3. ``stage1``: QLoRA contrastive steps of a randomly initialised 7B-class Llama (the llama3-8b shape
   of ``llmclip plan``) built through ``LLMEncoder.build`` (NF4, LoRA r16, gradient checkpointing,
   best attention, ``kernels: auto`` = Liger) + ``Stage1Module`` under DeepSpeed ZeRO-3
   (ds_configs/zero3_qlora.json), steps inside ``attention_backends`` (fused SDPA only): tokens/s,
   MFU (``llmclip plan``'s FLOP count) against the 40% target, peak memory vs the planner's estimate.
4. ``stage2``: ``CLIPModel`` with ViT-B/16 at 224 px on cached 4096-d embeddings under DeepSpeed
   ZeRO-2 bf16 (ds_configs/zero2_bf16.json): images/s, peak memory, MFU, planner estimates.

Each check records its own error instead of stopping the others; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

GiB = 1024**3
MFU_TARGET = 0.40  # stage-1 QLoRA step on one GPU (issue #16); reported as met / not met


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (no CUDA)")
    p.add_argument("--checks", default="attention,kernels,stage1,stage2")
    p.add_argument("--out", default="", help="JSON path (default: benchmarks/results/...)")
    p.add_argument("--s1-micro-batch", type=int, default=8, help="query/positive/negative triples")
    p.add_argument("--s1-seq", type=int, default=512)
    p.add_argument("--s1-steps", type=int, default=6, help="timed steps (after 2 warm-up)")
    p.add_argument("--s2-batch", type=int, default=256)
    p.add_argument("--s2-steps", type=int, default=15, help="timed steps (after 3 warm-up)")
    p.add_argument("--workdir", default="", help="where the random 7B checkpoint is written")
    return p.parse_args(argv)


class Env:
    """Device, dtype and the sizes of this run (full GPU check or CPU smoke)."""

    def __init__(self, args: argparse.Namespace):
        self.smoke = args.cpu_smoke
        if not self.smoke and not torch.cuda.is_available():
            sys.exit(
                "gpu_check: torch sees no CUDA device; run on a GPU machine or use --cpu-smoke"
            )
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.args = args
        self.gpu = "cpu-smoke" if self.smoke else torch.cuda.get_device_name(0)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / GiB
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB

    def gpu_type(self) -> str:
        from llmclip.plan import PEAK_TFLOPS

        name = self.gpu.lower()
        for key in PEAK_TFLOPS:
            if key != "cpu" and key in name:
                return key
        return "cpu" if self.smoke else "h100"


def timed(env: Env, fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        env.sync()
        t0 = time.perf_counter()
        fn()
        env.sync()
        out.append(time.perf_counter() - t0)
    return out


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

    from llmclip.text.encoder import LLMEncoder, ModelConfig, make_bidirectional, make_causal

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
    from llmclip.text.encoder import LLMEncoder, LoraSection, ModelConfig
    from llmclip.text.kernels import _patch_liger, kernels_of

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


# ------------------------------------------------------------------------------------------------
# 3. stage 1 QLoRA
# ------------------------------------------------------------------------------------------------


def random_llama_dir(env: Env, work: Path) -> tuple[Path, str]:
    """A randomly initialised llama3-8b-shaped checkpoint (smoke: a tiny shape) + a real tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmclip.plan import MODELS
    from llmclip.text.sources import smollm2_tokenizer_dir

    name = "smoke-tiny" if env.smoke else "llama3-8b"
    out = work / f"random-{name}"
    if (out / "config.json").is_file():
        return out, name
    shape = MODELS["llama3-8b"]
    if env.smoke:
        from llmclip.plan import ModelShape

        shape = ModelShape(128, 2, 4, 2, 256, 49152, tied_embeddings=True)
        MODELS[name] = shape  # so the planner can be asked about the same shape
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied_embeddings,
        max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(env.device):
        model = LlamaForCausalLM(config).to(env.dtype)
    tmp = work / f".random-{name}.tmp"
    model.save_pretrained(tmp, max_shard_size="5GB")
    tok.save_pretrained(tmp)
    del model
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    os.replace(tmp, out)
    return out, name


def check_stage1(env: Env, work: Path) -> dict[str, Any]:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from llmclip.config import DeepSpeedSection, OptimConfig, RunConfig
    from llmclip.plan import MODELS, PEAK_TFLOPS, PlanInput, plan
    from llmclip.text.encoder import LoraSection, ModelConfig
    from llmclip.text.kernels import attention_backends, kernels_of, liger_status
    from llmclip.text.stage1 import (
        ObjectiveConfig,
        Stage1Config,
        Stage1Module,
        deepspeed_config,
        lr_lambda,
        param_groups,
    )

    a = env.args
    b, seq = (2, 32) if env.smoke else (a.s1_micro_batch, a.s1_seq)
    t0 = time.perf_counter()
    folder, model_name = random_llama_dir(env, work)
    build_s = time.perf_counter() - t0
    ds_json = "cpu_zero3.json" if env.smoke else "zero3_qlora.json"
    cfg = Stage1Config(
        run=RunConfig(out_dir=str(work / "stage1-run"), tensorboard=False),
        model=ModelConfig(
            source=str(folder), quantization="nf4", attention="auto", kernels="auto",
            max_length=seq, gradient_checkpointing=True, pooling="mean", lora=LoraSection(r=16, alpha=32),
        ),
        stage1=ObjectiveConfig(contrastive_scale=50.0, hard_negatives=1),
        optim=OptimConfig(lr=1e-4, warmup_steps=0, max_steps=1000),
        deepspeed=DeepSpeedSection(config=str(C.REPO / "ds_configs" / ds_json),
                                   micro_batch_size=b, precision="bf16" if not env.smoke else "fp32"),
    )  # fmt: skip
    C.single_rank_env()
    ds_config = deepspeed_config(cfg, 1)
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (alive while loading, as stage1.run does)
    env.reset_peak()
    t0 = time.perf_counter()
    from llmclip.text.encoder import LLMEncoder

    enc = LLMEncoder.build(cfg.model, torch.bfloat16 if not env.smoke else torch.float32)
    module = Stage1Module(enc, cfg.stage1)
    opt = torch.optim.AdamW(param_groups(module, cfg.optim.weight_decay), lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=opt, lr_scheduler=sched, config=ds_config
    )
    del hf_ds
    unset_hf_deepspeed_config()
    load_s = time.perf_counter() - t0
    load_peak = env.peak_gib()
    attn_impl = enc.base_model.config._attn_implementation
    kernels = kernels_of(enc.base_model)
    vocab = min(len(enc.tokenizer), enc.base_model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)

    def ids(rows: int) -> torch.Tensor:
        return torch.randint(3, vocab, (rows, seq), generator=gen).to(engine.device)

    def bucket(rows: int) -> dict[str, Any]:
        """One full-length bucket in ``LLMEncoder.tokenize_buckets``' format (no padding)."""
        ones = torch.ones(rows, seq, dtype=torch.long, device=engine.device)
        return {"input_ids": [ids(rows)], "attention_mask": [ones], "pool_mask": [ones],
                "inverse": torch.arange(rows, device=engine.device)}  # fmt: skip

    batch = {
        "kind": "contrastive", "queries": bucket(b), "docs": bucket(2 * b),
        "neg_valid": torch.ones(b, dtype=torch.bool, device=engine.device),
        "pos_ids": torch.arange(b, device=engine.device),
        "neg_ids": torch.arange(b, 2 * b, device=engine.device),
    }  # fmt: skip
    losses = []
    # from_pretrained returns the model in eval mode, and transformers only checkpoints in training
    # mode: without this the step keeps every layer's activations (102 GiB vs 11.6 on an H200).
    engine.train()

    def step() -> None:
        # Fused SDPA kernels only (flash, else memory-efficient; no math fallback), forward and the
        # checkpointed recomputation in backward alike; a no-op on the CPU and for flash-attn.
        with attention_backends(engine.device):
            out = engine(**batch)
            engine.backward(out["loss"])
        engine.step()
        losses.append(float(out["loss"].detach()))

    env.reset_peak()
    times = timed(env, step, steps=2 if env.smoke else a.s1_steps, warmup=1 if env.smoke else 2)
    step_s = C.median(times)
    tokens = 3 * b * seq
    gpu_type = env.gpu_type()
    est = plan(PlanInput(model=model_name, stage=1, gpus=1, nodes=1, seq=seq, micro_batch=3 * b,
                         quant="nf4", lora_r=16, zero_stage=3, grad_ckpt=True,
                         flash_attn=attn_impl == "flash_attention_2", mntp=False,
                         gpu_type=gpu_type))  # fmt: skip
    shape = MODELS[model_name]
    n_lin = shape.layers * shape.linear_params_per_layer()
    flops = (8 * n_lin + 12 * shape.layers * seq * shape.hidden) * tokens
    peak_tflops = PEAK_TFLOPS[gpu_type]
    mfu = flops / step_s / (peak_tflops * 1e12)
    peak = env.peak_gib()
    met = "met" if mfu >= MFU_TARGET else "NOT met"
    finite = all(map(lambda x: x == x and abs(x) != float("inf"), losses))
    liger_expected = liger_status()[0]
    print(f"gpu_check: stage1 MFU {mfu:.1%} (target >= {MFU_TARGET:.0%}: {met}); attention "
          f"{attn_impl}, kernels {kernels.get('kernels')} {kernels.get('applied') or kernels.get('reason')}; "
          f"peak memory "
          f"{peak:.1f} GiB vs llmclip plan {est['total_gib']:.1f} GiB (x{peak / est['total_gib']:.2f})",
          flush=True)  # fmt: skip
    return {
        "model": model_name, "params_b": shape.total_params() / 1e9,
        # ZeRO-3 leaves partitioned parameters empty; ds_numel is their real size.
        "trainable_m": sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()
                           if p.requires_grad) / 1e6,
        "attention": attn_impl, "kernels": kernels, "micro_batch_triples": b, "seq": seq, "tokens_per_step": tokens,
        "checkpoint_build_s": build_s, "load_s": load_s, "load_peak_gib": load_peak,
        "step_s_median": step_s, "step_s": times, "tokens_per_s": tokens / step_s,
        "mfu": mfu, "mfu_target": MFU_TARGET, "mfu_target_met": mfu >= MFU_TARGET,
        "mfu_flops": "llmclip plan's count: (8 N + 12 L s h) per token with checkpointing",
        "peak_tflops_assumed": peak_tflops,
        "peak_mem_gib": peak, "loss_first_last": [losses[0], losses[-1]],
        "finite": finite, "liger_expected": liger_expected,
        # correctness only (MFU is a target, reported above): finite losses, Liger on where usable
        "ok": finite and (bool(kernels.get("applied")) or not liger_expected),
        "plan": {k: est[k] for k in ("total_gib", "load_peak_gib", "step_time_s",
                                     "tokens_per_s_per_gpu", "activations_gib",
                                     "trainable_params_m")},
        "plan_memory_ratio": peak / est["total_gib"],
        "plan_step_time_ratio": step_s / est["step_time_s"],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------
# 4. stage 2 ViT-B/16
# ------------------------------------------------------------------------------------------------


def check_stage2(env: Env, work: Path) -> dict[str, Any]:
    import deepspeed

    from llmclip.clip.losses import total_loss
    from llmclip.clip.model import CLIPModel, ModelConfig, VisionConfig
    from llmclip.clip.stage2 import (
        Stage2Config,
        Stage2OptimConfig,
        build_ds_config,
        lr_factor,
        param_groups,
    )
    from llmclip.config import DeepSpeedSection, RunConfig
    from llmclip.plan import PEAK_TFLOPS, PlanInput, plan

    a = env.args
    if env.smoke:
        vision, size, b, text_dim, ds_json = "vit_tiny_patch16_224", 32, 8, 64, "cpu_zero2.json"
    else:
        vision, size, b, text_dim, ds_json = (
            "vit_base_patch16_224",
            224,
            a.s2_batch,
            4096,
            "zero2_bf16.json",
        )
    cfg = Stage2Config(
        run=RunConfig(out_dir=str(work / "stage2-run"), tensorboard=False),
        model=ModelConfig(vision=VisionConfig(name=vision), embed_dim=512),
        optim=Stage2OptimConfig(lr=5e-4, weight_decay=0.2, warmup_steps=0, max_steps=1000),
        deepspeed=DeepSpeedSection(config=str(C.REPO / "ds_configs" / ds_json), micro_batch_size=b,
                                   precision="fp32" if env.smoke else "bf16"),
    )  # fmt: skip
    C.single_rank_env()
    torch.manual_seed(0)
    env.reset_peak()
    model = CLIPModel(cfg.model, text_dim, size)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.optim))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=build_ds_config(cfg, 1)
    )
    dev = engine.device
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen).to(dev)
    text = torch.randn(b, text_dim, generator=gen).to(dev).to(torch.float16)
    labels = torch.zeros(b, 14, device=dev)
    losses = []

    def step() -> None:
        pixels = model.preprocess(images)
        feats = engine(pixels, text)
        loss, _ = total_loss(cfg.loss, feats, {"text_raw": text, "labels": labels})
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))

    times = timed(env, step, steps=2 if env.smoke else a.s2_steps, warmup=1 if env.smoke else 3)
    step_s = C.median(times)
    n_vis = sum(p.numel() for p in model.visual.parameters())
    patches = (size // 16) ** 2 + 1
    gpu_type = env.gpu_type()
    est = plan(PlanInput(stage=2, gpus=1, nodes=1, micro_batch=b, zero_stage=2, grad_ckpt=False,
                         vision_params_m=n_vis / 1e6, image_size=size, embed_dim=text_dim,
                         gpu_type=gpu_type))  # fmt: skip
    return {
        "vision": vision, "image_size": size, "batch": b, "text_dim": text_dim,
        "vision_params_m": n_vis / 1e6, "step_s_median": step_s, "step_s": times,
        "images_per_s": b / step_s, "peak_mem_gib": env.peak_gib(),
        "mfu": 6 * n_vis * patches * b / step_s / (PEAK_TFLOPS[gpu_type] * 1e12),
        "loss_first_last": [losses[0], losses[-1]],
        "plan": {k: est[k] for k in ("total_gib", "step_time_s", "tokens_per_s_per_gpu")},
        "plan_memory_ratio": env.peak_gib() / est["total_gib"],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C.offline_hub()
    env = Env(args)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    report: dict[str, Any] = {
        "format": "llmclip-gpu-check/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": env.gpu, "smoke": env.smoke, "torch": torch.__version__,
        "cuda": torch.version.cuda, "checks": {},
    }  # fmt: skip
    with contextlib.suppress(Exception):
        import transformers

        report["transformers"] = transformers.__version__
    failed = False
    out = Path(args.out) if args.out else default_out(env)
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="llmclip-gpu-check-"))
        )  # fmt: skip
        work.mkdir(parents=True, exist_ok=True)
        fns = {"attention": check_attention, "kernels": check_kernels, "stage1": check_stage1,
               "stage2": check_stage2}  # fmt: skip
        for name in checks:
            t0 = time.perf_counter()
            print(f"gpu_check: {name} ...", flush=True)
            try:
                res = fns[name](env, work)
                failed |= res.get("ok") is False
            except Exception as e:  # one broken check must not hide the others' numbers
                res = {
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-4000:],
                }
                failed = True
            res["seconds"] = time.perf_counter() - t0
            report["checks"][name] = res
            print(json.dumps({name: {k: v for k, v in res.items()
                                     if k not in ("traceback", "pairs", "summary")}},
                             default=str)[:1500], flush=True)  # fmt: skip
            for line in res.get("summary", []):
                print(f"gpu_check:   {line}", flush=True)
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
            # After every check, so a time limit still leaves the finished checks' numbers.
            tmp = out.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
            os.replace(tmp, out)
    print(f"gpu_check: wrote {out}")
    return 1 if failed else 0


def default_out(env: Env) -> Path:
    if env.smoke:
        return Path(tempfile.gettempdir()) / "llmclip-gpu-check-smoke.json"
    day = datetime.date.today().isoformat()
    gpu = re.sub(r"[^a-z0-9]+", "-", env.gpu.lower()).strip("-")
    return C.REPO / "benchmarks" / "results" / f"gpu-check-{day}-{gpu}.json"


if __name__ == "__main__":
    sys.exit(main())
