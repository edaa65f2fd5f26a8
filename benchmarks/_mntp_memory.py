"""The MNTP part of ``stage1_step.py``: one MNTP step's peak memory with the chunked cross-entropy,
against the blanked rows' logits materialised and against logits at every position (llm2vec's way).

Each variant runs in a fresh process (``stage1_step.py --mntp-child VARIANT``), so one variant's
allocations never hide in another's high-water mark.
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
    peaks: dict[str, list[float]] = {"chunked": [], "materialised": [], "every-position": []}
    info = {}
    for _ in range(args.mntp_reps):
        for variant in peaks:
            out = subprocess.run([*base, "--mntp-child", variant], check=True, text=True,
                                 capture_output=True, cwd=C.REPO).stdout
            rec = json.loads(out.strip().splitlines()[-1])
            peaks[variant].append(rec.pop("step_peak_mib"))
            info = rec  # vocab, blanked rows, precision: the same in every child
    chunk, full = C.median(peaks["chunked"]), C.median(peaks["materialised"])
    every = C.median(peaks["every-position"])
    ckpt = "without" if args.mntp_no_ckpt else "with"
    print(f"MNTP step, {args.mntp_reports} reports, vocab {info['vocab']}, {info['rows']} blanked "
          f"tokens ({info['precision']}, {ckpt} gradient checkpointing): peak memory above the step's start, median of "
          f"{args.mntp_reps} fresh processes: chunked {chunk:.0f} MiB vs materialised logits "
          f"{full:.0f} MiB = {chunk / full:.2f} [target <= 0.50: {'met' if chunk <= full / 2 else 'NOT met'}]")
    print(f"  vs logits at every position, as llm2vec's MNTP computes them ({every:.0f} MiB): "
          f"{chunk / every:.2f} [target <= 0.50: {'met' if chunk <= every / 2 else 'NOT met'}]")
    return {"step_peak_mib": peaks, "ratio": chunk / full, "ratio_every_position": chunk / every,
            "checkpointing": ckpt == "with", **info}


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


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
        gc.collect()
        # The kernel's own high-water mark, reset here (Linux: clear_refs 5): exact, no sampling.
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")
        start = _proc_status_kib("VmRSS")
        if args.mntp_child == "every-position":
            every_position_loss(step.module, b["buckets"]).backward()
        else:
            step.module(**b)["loss"].backward()
        peak = _proc_status_kib("VmHWM")
    print(json.dumps({"step_peak_mib": (peak - start) / 1024, "vocab": enc.lm_head.weight.shape[0],
                      "rows": sum(int((x != -100).sum()) for x in b["buckets"]["labels"]), "precision": precision(cfg.deepspeed)}))
    return 0
