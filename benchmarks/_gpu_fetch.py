"""Check ``fetch`` of ``gpu_check.py``: ZeRO-3 fetch units side by side, on one GPU, in one run.

The stage-1 check's ZeRO-3 step is host-bound at 12K tokens, so its MFU moves with the host CPU:
two leases of the same code measured 52.7% and 39.3%. Comparing fetch units across separate runs
therefore compares machines as much as units. Here one process builds check 3's engine once per
unit (``--fetch-units``, e.g. ``layer,lora,none``: decoder layers, LoRA linears, DeepSpeed's
per-module hooks), on the same random weights and batch, and times their steps interleaved in
rotating order; each unit's MFU and the ratio of median step times come from the same machine.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from _gpu_steps import MFU_TARGET, build_stage1, stage1_mfu  # noqa: E402

UNITS = ("layer", "lora", "none")
Env = Any  # gpu_check.Env


def fetch_units(spec: str) -> list[str]:
    """``--fetch-units``: two or more distinct units of ``UNITS``, comma-separated."""
    units = [u.strip() for u in spec.split(",") if u.strip()]
    bad = [u for u in units if u not in UNITS]
    if bad or len(set(units)) != len(units) or len(units) < 2:
        raise ValueError(f"--fetch-units must name 2-3 distinct units of {', '.join(UNITS)}; got {spec!r}")
    return units


def check_fetch(env: Env, work: Path) -> dict[str, Any]:
    a = env.args
    if a.s1_zero != 3:
        return {"skipped": "fetch units are a ZeRO-3 setting; run with --s1-zero 3"}
    units = fetch_units(a.fetch_units)
    built = {u: build_stage1(env, work, u) for u in units}
    steps, warmup = (2, 1) if env.smoke else (a.s1_steps, 2)

    def synced(step):  # a step's time includes its GPU work; the next one starts on an idle GPU
        return lambda: (step(), env.sync())

    times = C.interleaved({u: synced(built[u]["step"]) for u in units}, reps=steps, warmup=warmup)
    first = built[units[0]]
    b, seq, model = first["b"], first["seq"], first["model_name"]
    peer = units[-1]
    out: dict[str, Any] = {"units": units, "tokens_per_step": 3 * b * seq, "steps": steps,
                           "ds_config": first["ds_json"], "zero_overrides": first["zero_opts"],
                           "peer": peer, "per_unit": {}}
    for u in units:
        med = C.median(times[u])
        mfu = stage1_mfu(env, model, b, seq, med)
        losses = built[u]["losses"]
        row = {"leaves": built[u]["leaves"], "step_s": times[u], "step_s_median": med, "mfu": mfu,
               "mfu_target_met": mfu >= MFU_TARGET, "loss_first_last": [losses[0], losses[-1]]}
        if u != peer:
            row[f"ratio_vs_{peer}"] = C.ratio_of_medians(times[u], times[peer]).as_dict()
        out["per_unit"][u] = row
        print(f"gpu_check: fetch {u:<5} ({row['leaves']} leaves) median {med:.2f} s "
              f"({min(times[u]):.2f}-{max(times[u]):.2f}), MFU {mfu:.1%}"
              + (f", {row[f'ratio_vs_{peer}']['value']:.2f}x {peer}" if u != peer else ""), flush=True)
    # Same weights and batch: every unit's first loss is the same number (the step is the same math).
    out["first_losses_equal"] = len({round(r["loss_first_last"][0], 4) for r in out["per_unit"].values()}) == 1
    out["ok"] = out["first_losses_equal"]
    return out
