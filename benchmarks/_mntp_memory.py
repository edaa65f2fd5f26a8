"""The MNTP part of ``stage1_step.py``: one MNTP step's peak memory with the chunked cross-entropy,
against the blanked rows' logits materialised and against logits at every position (llm2vec's way).

Each variant runs in a fresh process (``stage1_step.py --mntp-child VARIANT``), so one variant's
allocations never hide in another's high-water mark. Two peaks per step, both above the step's
start:

- **tensors**: the most bytes of live tensors at any moment, summed from the profiler's allocation
  and free events (what ``torch.cuda.max_memory_allocated`` reports on a GPU): what the step needs.
- **resident**: the process's resident-set high-water mark (the kernel's, exact): what the step
  costs with glibc's allocator, which keeps freed heap chunks mapped, so its figure carries the
  fragmentation the step leaves behind as well as its tensors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "stage1_step.py"


def mntp_memory(args: argparse.Namespace) -> dict:
    """Peak resident memory of one MNTP step above its start, each variant in fresh processes
    (interleaved, ``--mntp-reps`` each), at the recipe's vocabulary."""
    base = [sys.executable, str(SCRIPT), "--config", args.config, "--hidden", str(args.hidden),
            "--layers", str(args.layers), "--heads", str(args.heads), "--kv-heads",
            str(args.kv_heads), "--intermediate", str(args.intermediate), "--threads",
            str(args.threads), "--mntp-reports", str(args.mntp_reports), "--vocab", str(args.vocab)]
    if args.precision:
        base += ["--precision", args.precision]
    if args.mntp_no_ckpt:
        base += ["--mntp-no-ckpt"]
    variants = ("chunked", "materialised", "every-position")
    peaks: dict[str, list[float]] = {v: [] for v in variants}  # resident (RSS high-water mark)
    tensors: dict[str, list[float]] = {v: [] for v in variants}
    info = {}
    for _ in range(args.mntp_reps):
        for variant in variants:
            out = subprocess.run([*base, "--mntp-child", variant], check=True, text=True,
                                 capture_output=True, cwd=C.REPO).stdout
            rec = json.loads(out.strip().splitlines()[-1])
            peaks[variant].append(rec.pop("step_peak_mib"))
            tensors[variant].append(rec.pop("tensor_peak_mib"))
            info = rec  # vocab, blanked rows, precision: the same in every child
    ckpt = "without" if args.mntp_no_ckpt else "with"
    print(f"MNTP step, {args.mntp_reports} reports, vocab {info['vocab']}, {info['rows']} blanked "
          f"tokens ({info['precision']}, {ckpt} gradient checkpointing): peak memory above the "
          f"step's start, median of {args.mntp_reps} fresh processes [target <= 0.50]")
    ratios = {}
    for name, got in (("tensors", tensors), ("resident", peaks)):
        chunk, full, every = (C.median(got[v]) for v in variants)
        ratios[name] = {"materialised": chunk / full, "every_position": chunk / every}
        print(f"  {name:<8} chunked {chunk:5.0f} MiB vs materialised logits {full:5.0f} MiB = "
              f"{chunk / full:.2f} [{'met' if chunk <= full / 2 else 'NOT met'}]; vs logits at every "
              f"position as llm2vec computes them ({every:.0f} MiB) {chunk / every:.2f}")
    return {"step_peak_mib": peaks, "tensor_peak_mib": tensors, "ratios": ratios,
            "ratio": ratios["tensors"]["materialised"],
            "ratio_resident": ratios["resident"]["materialised"],
            "ratio_every_position": ratios["tensors"]["every_position"],
            "checkpointing": ckpt == "with", **info}


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def tensor_peak_mib(step) -> float:
    """The most MiB of live tensors above the start while ``step()`` runs, from the profiler's
    allocation (+) and free (-) events in time order: independent of the allocator's caching."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def every_position_loss(module, buckets: dict) -> torch.Tensor:
    """The MNTP loss the way llm2vec (and a Hugging Face causal-LM head) computes it: the LM head
    over every position, fp32 logits, cross-entropy with the unblanked positions ignored. Same
    forward passes and buckets as llmclip's step; only the head differs."""
    import torch.nn.functional as F

    enc, total, rows = module.encoder, 0.0, 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=module.autocast):
        for ids, mask, labels in zip(buckets["input_ids"], buckets["attention_mask"],
                                     buckets["labels"], strict=True):
            logits = enc.lm_head(enc.hidden_states(ids, mask)[:, :-1]).float()
            target = labels[:, 1:]
            total = total + F.cross_entropy(logits.flatten(0, 1), target.flatten(),
                                            ignore_index=-100, reduction="sum")
            rows += int((target != -100).sum())
    return total / max(rows, 1)


def mntp_child(args: argparse.Namespace) -> int:
    """One MNTP forward + backward in this fresh process; prints its peak RSS above the start."""
    import gc

    import stage1_step as S  # this process runs stage1_step.py; its helpers, imported once more

    from llmclip.text.objectives import blank_token_id
    from llmclip.text.sources import build_tiny_llama
    from llmclip.text.stage1 import precision
    from llmclip.text.stage1_batch import make_batch

    C.set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="llmclip-bench-mntp-") as tmp:
        model_dir = build_tiny_llama(S.model_spec(args), str(Path(tmp) / "models"))
        cfg = S.stage1_config(args, model_dir, Path(tmp) / "run")
        if args.mntp_child == "materialised":
            cfg.stage1.mntp_chunk_mib = 0.0
        cfg.model.gradient_checkpointing = not args.mntp_no_ckpt
        step = S.LLMClipPlainStep(cfg)
        enc = step.encoder
        metas = S.openi_metas(args.mntp_reports)
        blank = blank_token_id(enc.tokenizer)
        # A two-report warm-up first: one-time allocations (kernel workspaces, lazy inits) are not
        # the step's memory, and a small warm-up leaves too little behind to hide the real peak.
        warm = step.module(**make_batch("mntp", metas[:2], enc, cfg.stage1, 1, blank, 0))
        warm["loss"].backward()
        del warm
        b = make_batch("mntp", metas, enc, cfg.stage1, 0, blank, 0)

        def run() -> None:
            if args.mntp_child == "every-position":
                every_position_loss(step.module, b["buckets"]).backward()
            else:
                step.module(**b)["loss"].backward()

        gc.collect()
        # The kernel's own high-water mark, reset here (Linux: clear_refs 5): exact, no sampling.
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")
        start = _proc_status_kib("VmRSS")
        run()
        peak = _proc_status_kib("VmHWM")
        step.module.zero_grad(set_to_none=True)
        gc.collect()
        tensors = tensor_peak_mib(run)  # the same step once more, its tensors counted
    print(json.dumps({"step_peak_mib": (peak - start) / 1024, "tensor_peak_mib": tensors,
                      "vocab": enc.lm_head.weight.shape[0],
                      "rows": sum(int((x != -100).sum()) for x in b["buckets"]["labels"]), "precision": precision(cfg.deepspeed)}))
    return 0
