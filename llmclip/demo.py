"""`llmclip demo`: the whole pipeline on the embedded default, on a laptop CPU.

It drives the real commands, in order, as subprocesses -- exactly what a user would type:

    shards build (Open-I reports from torchxrayvision, rendered images, patient-level split)
    stage 1      (deepspeed, 2 CPU ranks, SmolLM2-135M made bidirectional, LoRA)
    cache build  (frozen encoder over every report: report, negated, laterality, severity edits)
    stage 2      (deepspeed, 2 CPU ranks, timm ViT on cached embeddings, clinical losses)
    eval text    (seen and held-out variant families, with intervals, vs baselines; val + test),
                 then the encoder's model card refreshed with them (llmclip export)
    eval         (zero-shot and binary AUROC, linear probe, retrieval, CXR-Align, report.html)

Each step first asks whether its output is already complete and skips if so, so a rerun after a
kill resumes where it stopped, and a rerun after success finishes in seconds. ``--quick`` is the
same pipeline with fewer reports, smaller images and fewer steps (used by the test suite).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmclip.config import ConfigError
from llmclip.distributed import free_port

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Step:
    name: str
    """Short name shown on the progress line."""
    done: Callable[[], bool]
    """True when the step's output is complete (then it is skipped)."""
    commands: list[list[str]]
    """Commands run in order; a non-zero exit stops the demo with that step named."""


def _exists(path: Path) -> Callable[[], bool]:
    return lambda: path.exists()


def _bin(name: str) -> str:
    """A console script of the running environment (the venv's deepspeed/llmclip), else PATH."""
    here = Path(sys.executable).parent / name
    found = here if here.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"'{name}' not found next to {sys.executable} or on PATH; install the project first")
    return str(found)


def _deepspeed(config: str, overrides: list[str], ranks: int) -> list[str]:
    cmd = [_bin("deepspeed"), "--master_port", str(free_port()), "--num_gpus", str(ranks),
           str(REPO / "llmclip" / "train.py"), "--config", config]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _image_size(quick: bool) -> str:
    """Rendered image side in pixels: shards are rendered at the size stage 2 trains on."""
    return "64" if quick else "128"


def _stage2_overrides(out: Path, run: Path, quick: bool) -> list[str]:
    """Stage 2 of the demo (or an ablation) on the demo's shards and cache; smaller when quick.

    ``data.encoder`` names the demo's stage-1 encoder: the run records it (relative to the run),
    so ``llmclip.load(run)`` encodes free text with no further argument."""
    over = [f"run.out_dir={run}", f"data.shards={out / 'shards'}:train", f"data.cache={out / 'cache'}",
            f"data.encoder={out / 'stage1' / 'final'}", f"data.image_size={_image_size(quick)}"]
    return over + (["optim.max_steps=60", "optim.warmup_steps=5"] if quick else [])


def plan_steps(out: Path, quick: bool, ranks: int) -> list[Step]:
    """The demo's steps. ``quick`` shrinks data, images and step counts, not the code path."""
    llmclip = _bin("llmclip")
    shards = out / "shards"
    stage1, cache, stage2 = out / "stage1", out / "cache", out / "stage2"
    maxcount = ["--maxcount", "900"] if quick else []
    s1_over = [f"run.out_dir={stage1}", f"data.shards={shards}:train"]
    s2_over = _stage2_overrides(out, stage2, quick)
    if quick:
        # 64 calibration reports instead of 128: the statistics only centre and scale the pool.
        # 2 layers: the step cost grows with the layer count, and quick only shows the path runs.
        s1_over += ["optim.max_steps=40", "optim.warmup_steps=2", "stage1.mntp_steps=2",
                    "model.calibration_reports=64", "model.keep_layers=2"]
    # Quick mode compares with the baselines that cost nothing to load (MiniLM is a model load).
    text_baselines = ["--baselines", "tfidf,base-llm"] if quick else []
    return [
        Step("shards", _exists(shards / "manifest.json"),
             [[llmclip, "shards", "build", "--source", "openi", "--out", str(shards), "--images", "render",
               "--image-size", _image_size(quick), *maxcount]]),
        Step("stage 1", _exists(stage1 / "final" / "encoder.json"),
             [_deepspeed(str(REPO / "configs/stage1/demo.yaml"), s1_over, ranks)]),
        Step("cache", _exists(cache / "meta.json"),
             [[llmclip, "cache", "build", "--encoder", str(stage1 / "final"), "--shards", str(shards),
               "--out", str(cache), "--variants", "report,negated,laterality,severity"]]),
        Step("stage 2", _exists(stage2 / "final" / "clip.json"),
             [_deepspeed(str(REPO / "configs/stage2/demo.yaml"), s2_over, ranks)]),
        Step("eval text", _exists(out / "eval_text.json"),
             # val + test: both held-out patients (nothing selects on val), twice the items.
             [[llmclip, "eval", "text", "--encoder", str(stage1 / "final"), "--shards", f"{shards}:val,test",
               "--max-reports", "800", "--out", str(out / "eval_text.json"), *text_baselines],
              # the encoder's model card then carries these held-out figures (same fingerprint)
              [llmclip, "export", str(stage1 / "final"), "--metrics", str(out / "eval_text.json")]]),
        Step("eval", _exists(out / "eval" / "metrics.json"),
             [[llmclip, "eval", "--model", str(stage2), "--shards", f"{shards}:val,test", "--cache", str(cache),
               "--encoder", str(stage1 / "final"), "--out", str(out / "eval"),
               "--text-metrics", str(out / "eval_text.json")]]),
    ]


ABLATIONS = ("baseline", "neg", "soft", "graph", "full")
"""Stage-2 recipes of ``configs/stage2/ablations/``: the baseline, one addition each, all three."""
ABLATION_KEYS = ("zero_shot_macro_auroc", "i2t_r1", "t2i_r1", "negation_accuracy", "seen_laterality_accuracy",
                 "seen_severity_accuracy", "heldout_negation_accuracy", "heldout_omission_accuracy",
                 "heldout_laterality_accuracy", "heldout_severity_accuracy", "linear_probe_macro_auroc")
"""Headline figures of the ablation table and the demo summary, each printed with its 95% interval."""


def _with_ci(m: dict, key: str) -> str:
    from llmclip.eval.stats import fmt_ci

    ci = (m.get("ci") or {}).get(key)
    return fmt_ci(ci, pct=False, digits=3) if ci else "-"


def ablation_steps(out: Path, quick: bool, ranks: int, names: list[str]) -> list[Step]:
    """Train and evaluate every ablation recipe on the demo's shards and cache (after the demo).

    ``full`` is the demo's own stage-2 recipe, so its run is reused rather than trained twice.
    """
    llmclip = _bin("llmclip")
    shards, cache, stage1 = out / "shards", out / "cache", out / "stage1"
    steps = []
    for name in names:
        run = out / "stage2" if name == "full" else out / "ablations" / name
        over = _stage2_overrides(out, run, quick)
        if name != "full":
            steps.append(Step(f"abl. {name}", _exists(run / "final" / "clip.json"),
                              [_deepspeed(str(REPO / f"configs/stage2/ablations/{name}.yaml"), over, ranks)]))
        res = out / "ablations" / name / "eval"
        steps.append(Step(f"eval {name}", _exists(res / "metrics.json"),
                          [[llmclip, "eval", "--model", str(run), "--shards", f"{shards}:val,test", "--cache", str(cache),
                            "--encoder", str(stage1 / "final"), "--out", str(res)]]))
    return steps


def ablation_table(out: Path) -> str:
    """Markdown table of the ablation runs' held-out metrics (what the README shows)."""
    head = "| recipe | " + " | ".join(ABLATION_KEYS) + " |"
    lines = [head, "|---|" + "---:|" * len(ABLATION_KEYS)]
    for name in ABLATIONS:
        path = out / "ablations" / name / "eval" / "metrics.json"
        if path.exists():
            m = json.loads(path.read_text())
            vals = [_with_ci(m, k) for k in ABLATION_KEYS]
            lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m:d}m{s:02d}s"


def run_steps(steps: list[Step], log_dir: Path) -> dict[str, float]:
    """Run each incomplete step, one progress line per step; the step's own tqdm shows inside."""
    log_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for i, step in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {step.name:10s}"
        if step.done():
            print(f"{head} already complete, skipped", flush=True)
            timings[step.name] = 0.0
            continue
        print(f"{head} running ...", flush=True)
        t0 = time.time()
        for cmd in step.commands:
            log = log_dir / f"{i:02d}-{step.name.replace(' ', '_')}.log"
            print("    $ " + " ".join(cmd), flush=True)
            with open(log, "a") as fh:
                fh.write("$ " + " ".join(cmd) + "\n")
            # Output goes to the terminal (progress bars) and, via tee-like copy, to the step log.
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            stream = proc.stdout
            assert stream is not None
            with open(log, "ab") as fh:
                while chunk := stream.read1(4096):
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                    fh.write(chunk)
            if proc.wait() != 0:
                raise SystemExit(f"llmclip demo: step '{step.name}' failed (exit {proc.returncode}); log: {log}. "
                                 "Rerun `make demo` to resume from this step.")
        if not step.done():
            raise SystemExit(f"llmclip demo: step '{step.name}' exited 0 but its output is incomplete")
        timings[step.name] = time.time() - t0
        print(f"{head} done in {_fmt(timings[step.name])} (total {_fmt(time.time() - t_all)})", flush=True)
    return timings


def summary(out: Path) -> str:
    """The terminal summary: the headline numbers of eval text and eval, read from their JSON."""
    from llmclip.eval.text import format_table

    lines = ["", "llmclip demo summary (images are rendered from real Open-I reports: synthetic)", "-" * 78]
    text = out / "eval_text.json"
    if text.exists():
        lines += ["Stage 1 text encoder vs baselines (held-out reports, %):", format_table(json.loads(text.read_text())), ""]
    metrics = out / "eval" / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        lines.append("Stage 2 CLIP on held-out patients:")
        for key in ("zero_shot_macro_auroc", "i2t_r1", "t2i_r1", *ABLATION_KEYS[3:]):
            lines.append(f"  {key:28s} {_with_ci(m, key)}")
        lines.append(f"report: {out / 'report.html'}")
    return "\n".join(lines)


def _ablation_names(spec: str | None) -> list[str]:
    if not spec:
        return []
    names = list(ABLATIONS) if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in ABLATIONS]
    if bad:
        raise ConfigError(f"unknown ablation(s) {bad}; choose from {', '.join(ABLATIONS)} or all", "--ablations")
    return names


def _cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo")).resolve()
    steps = plan_steps(out, quick=args.quick, ranks=args.ranks)
    names = _ablation_names(args.ablations)
    if names:
        steps += ablation_steps(out, quick=args.quick, ranks=args.ranks, names=names)
    t0 = time.time()
    run_steps(steps, out / "logs")
    report = out / "eval" / "report.html"
    if report.exists() and not (out / "report.html").exists():
        shutil.copyfile(report, out / "report.html")
    print(summary(out))
    if names:
        table = ablation_table(out)
        (out / "ablations.md").write_text(table + "\n", encoding="utf-8")
        print("\nStage-2 ablations (held-out patients):\n" + table)
    print(f"demo finished in {_fmt(time.time() - t0)}; results in {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded default (CPU, no data needed)")
    p.add_argument("--quick", action="store_true", help="fewer reports, smaller images, fewer steps, no MiniLM baseline (~5 min on 2 cores)")
    p.add_argument("--out", default=None, help="output folder (default runs/demo or runs/demo-quick)")
    p.add_argument("--ranks", type=int, default=2, help="ranks for the deepspeed launcher (CPU: 2)")
    p.add_argument("--ablations", default=None, metavar="NAMES",
                   help="after the demo, also train and evaluate stage-2 ablation recipes: 'all' or a comma "
                        f"list of {', '.join(ABLATIONS)}")
    p.set_defaults(func=_cmd_demo)
