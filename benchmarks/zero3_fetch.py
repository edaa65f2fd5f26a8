"""ZeRO-3 fetch units, stage-1 step time: decoder layers or LoRA linears as leaf modules vs
DeepSpeed's own per-module hooks, in one interleaved run.

    python benchmarks/zero3_fetch.py                  # 32 layers x 128 wide: an 8B's depth, host-bound
    python benchmarks/zero3_fetch.py --shape recipe   # the demo recipe's SmolLM2 cut (4 x 576)

ZeRO-3 gathers and releases parameters in hooks around every module that owns some, and reduces
gradients from hooks too; that bookkeeping is host (Python) time per module and call, whatever
the device. On one H200 it, not the GPU, set the pace of the 8B QLoRA step at 12K tokens (README,
"Measured figures"). This benchmark measures that host cost where it can be isolated on a CPU: a
model as deep as an 8B (32 layers) but narrow, so each module's compute is small next to its hooks,
micro-batch 2. The same llmclip stage-1 engine step (``Stage1Module`` under ``deepspeed.initialize``
with the recipe's CPU DeepSpeed JSON at stage 3, every weight partitioned, gradient checkpointing as
the 7-8B recipes, one length bucket) runs three times over in one process, differing only in
``llmclip.ds_config.mark_zero3_leaves``:

- ``none``: DeepSpeed's per-module hooks (what DeepSpeed does by default: the peer);
- ``lora``: each peft LoRA linear (wrapper, base, dropout, A, B) one fetch unit;
- ``layer``: each decoder layer one fetch unit (``deepspeed.zero3_leaf: auto`` at one bucket).

Same weights, same batches of real Open-I pairs, same threads; repetitions interleaved in rotating
order; ratios of median seconds. What it does not show: the GPU step's MFU (``gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

MODES = ("none", "lora", "layer")
SHAPES = {  # stage1_step.py's model arguments
    "deep": ["--layers", "32", "--hidden", "128", "--heads", "4", "--kv-heads", "2",
             "--intermediate", "344"],
    "recipe": [],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="deep")
    p.add_argument("--batch", type=int, default=2, help="queries per micro-step")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per repetition")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--precision", default="fp32", choices=("fp32", "auto"))
    p.add_argument("--threads", type=int, default=1, help=C.THREADS_HELP)
    p.add_argument("--json", default="", help="also write every repetition to this JSON file")
    args = p.parse_args(argv)
    os.chdir(C.REPO)
    C.offline_hub()
    import stage1_step as S

    from llmclip.text.sources import build_tiny_llama

    s_args = S.parse_args([*SHAPES[args.shape], "--zero-stage", "3", "--precision", args.precision,
                           "--batch", str(args.batch)])
    threads = C.set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="llmclip-bench-z3-") as tmp:
        model_dir = build_tiny_llama(S.model_spec(s_args), str(Path(tmp) / "models"))
        cfg = S.stage1_config(s_args, model_dir, Path(tmp) / "run")
        cfg.stage1.length_buckets = 1  # leaves need one forward per micro-step
        cfg.model.gradient_checkpointing = True
        # Every weight partitioned (persistence 0): each module's hooks gather something.
        steps = {m: S.LLMClipEngineStep(cfg, leaf=m, zero_opts={"stage3_param_persistence_threshold": 0})
                 for m in MODES}
        C.set_threads(args.threads)  # DeepSpeed's CPU accelerator may have changed it
        metas = S.openi_metas(args.batch * args.steps)
        _, batches = S.step_batches(metas, steps["none"].encoder, cfg.stage1, args.batch, args.steps)
        times = C.interleaved({m: (lambda s=s: [s.step(b) for b in batches]) for m, s in steps.items()},
                              reps=args.reps, warmup=1)
    rows = [[m, steps[m].leaves, C.median(times[m]) / args.steps, f"±{100 * C.spread(times[m]):.0f}%",
             C.median(times["none"]) / C.median(times[m]), f"{steps[m].loss:.5f}"] for m in MODES]
    print(f"ZeRO-3 stage-1 contrastive step, shape {args.shape} ({s_args.layers} layers x "
          f"{s_args.hidden}), {args.batch} queries x (1 + {cfg.stage1.hard_negatives}) documents, "
          f"{args.precision}, gradient checkpointing, every weight partitioned, {threads} thread(s), "
          f"{args.reps} interleaved reps x {args.steps} steps")
    print(C.table(["fetch unit", "leaves", "s/step", "noise", "vs per-module hooks", "final loss"], rows))
    vs_none = C.ratio_of_medians(times["layer"], times["none"])
    vs_lora = C.ratio_of_medians(times["layer"], times["lora"])
    print(f"RATIO decoder-layer leaves vs DeepSpeed's per-module hooks: {vs_none}")
    print(f"RATIO decoder-layer leaves vs LoRA-linear leaves: {vs_lora}")
    C.write_json(args.json, {"benchmark": "zero3_fetch", "args": vars(args), "threads": threads,
                             "layers": s_args.layers, "hidden": s_args.hidden, "seconds": times,
                             "leaves": {m: steps[m].leaves for m in MODES},
                             "final_loss": {m: steps[m].loss for m in MODES},
                             "ratio_layer_vs_none": vs_none.as_dict(),
                             "ratio_layer_vs_lora": vs_lora.as_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
