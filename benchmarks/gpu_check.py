"""The Python side of ``benchmarks/gpu_check.sh``: four GPU checks (and an opt-in fifth), one JSON.

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
5. ``fetch`` (only when named in ``--checks``): check 3's ZeRO-3 step once per fetch unit of
   ``--fetch-units`` in one process, timed interleaved: each unit's MFU on the same machine, and
   the ratio of median step times (``_gpu_fetch.py``).

Each check records its own error instead of stopping the others; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (no CUDA)")
    p.add_argument("--checks", default="attention,kernels,stage1,stage2")
    p.add_argument("--out", default="", help="JSON path (default: benchmarks/results/...)")
    p.add_argument("--s1-micro-batch", type=int, default=8, help="query/positive/negative triples")
    p.add_argument("--s1-seq", type=int, default=512)
    p.add_argument("--s1-steps", type=int, default=6, help="timed steps (after 2 warm-up)")
    p.add_argument("--s1-zero", type=int, choices=(2, 3), default=3,
                   help="ZeRO stage of the stage-1 step (3: ds_configs/zero3_qlora.json; "
                        "2: ds_configs/zero2_bf16.json, the 7-8B recipes' default)")
    p.add_argument("--s1-zero-opts", default="",
                   help='JSON merged into the stage-1 zero_optimization section, e.g. '
                        '\'{"stage3_param_persistence_threshold": 262144}\' (recorded in the JSON)')
    p.add_argument("--s1-zero3-leaf", choices=("layer", "lora", "none"), default="layer",
                   help="ZeRO-3 fetch unit (deepspeed.zero3_leaf; the check's micro-step is one "
                        "forward, where auto = layer): layer = each decoder layer, lora = each LoRA "
                        "linear, none = DeepSpeed's per-module hooks")
    p.add_argument("--fetch-units", default="layer,lora",
                   help="the fetch check's ZeRO-3 units, timed interleaved on one GPU (2-3 of "
                        "layer, lora, none; ratios against the last)")
    p.add_argument("--s1-profile", action="store_true",
                   help="profile one extra stage-1 step: the top CUDA kernels and GPU busy time")
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


from _gpu_equality import check_attention, check_kernels  # noqa: E402
from _gpu_fetch import check_fetch  # noqa: E402
from _gpu_steps import check_stage1, check_stage2  # noqa: E402

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
               "stage2": check_stage2, "fetch": check_fetch}  # fmt: skip
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
