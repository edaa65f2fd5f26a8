"""Stage-1 contrastive step, tokens/s: llmclip vs the llm2vec package's reference implementation.

    python benchmarks/stage1_step.py                  # tiny Llama 4 x 256, 16 pairs (~5 min, 2 cores)
    python benchmarks/stage1_step.py --hidden 576 --layers 8 --batch 32

Both sides train LoRA (r 16, alpha 32, dropout 0.05, on q,k,v,o,gate,up,down) on the *same* tiny
Llama (random weights from a config, real SmolLM2 tokenizer, saved once to a temporary folder),
bidirectional attention (sdpa), mean pooling over the report tokens (instruction excluded),
InfoNCE at scale 50 with one hard negative per query, fp32, AdamW, gradient-norm clip 1.0, on the
same batches of real Open-I report pairs built by ``llmclip.text.pairs.build_pairs``:

- ``llmclip``: what ``llmclip/train.py`` runs for stage 1 on a CPU -- ``LLMEncoder.build`` +
  ``Stage1Module`` (contrastive objective) under a DeepSpeed engine with the repo's
  ``ds_configs/cpu_zero3.json``, on the tensors of ``llmclip.text.stage1.make_batch`` (queries and
  documents each split into length buckets, every bucket padded only to its own longest row); the row ``llmclip (no DeepSpeed)`` is the same module with a bare
  torch AdamW loop, to show what the engine costs on one rank;
- ``llm2vec``: llm2vec 0.2.x's supervised step (see ``_llm2vec_peer.py``), in its own venv
  (``.bench-venv/llm2vec``, created here on first use: llm2vec pins transformers 4.44), in a
  subprocess that exchanges only numbers (JSON) with this one.

Tokenisation is data-loader work on both sides and is not timed. Repetitions are interleaved in
rotating order (the peer process idles while this one runs, and the other way round); medians.
tokens/s counts each side's own non-padding tokens of query, positive and negative.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

VENV = C.REPO / ".bench-venv" / "llm2vec"
# Versions that install together and run on this machine's torch (llm2vec 0.2.3 requires
# transformers <= 4.44.2; peft releases after 0.12 need a newer transformers).
PEER_PACKAGES = ["torch==2.14.1", "llm2vec==0.2.3", "transformers==4.44.2", "peft==0.12.0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256, help="tiny Llama width")
    p.add_argument("--layers", type=int, default=4, help="tiny Llama depth")
    p.add_argument("--batch", type=int, default=16, help="query/positive/negative triples per step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per timed repetition")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help=C.THREADS_HELP)
    p.add_argument("--no-plain", action="store_true", help="skip the no-DeepSpeed llmclip row")
    p.add_argument(
        "--zero-stage", type=int, default=None, choices=(0, 1, 2, 3),
        help="override the ZeRO stage of ds_configs/cpu_zero3.json (default: its 3)",
    )  # fmt: skip
    p.add_argument(
        "--buckets", type=int, default=4, help="length buckets of the proposal row (0 = skip)"
    )
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# The peer's venv
# ------------------------------------------------------------------------------------------------


def ensure_peer_venv() -> Path:
    """``.bench-venv/llm2vec`` with PEER_PACKAGES (isolated from .venv); created once."""
    py = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    want = " ".join(PEER_PACKAGES)
    if py.exists() and stamp.exists() and stamp.read_text(encoding="utf-8") == want:
        return py
    base = getattr(sys, "_base_executable", sys.executable)
    cmds = [
        [base, "-m", "venv", "--clear", str(VENV)],
        [str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES],
    ]
    for cmd in cmds:
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    stamp.write_text(want, encoding="utf-8")
    return py


class Peer:
    """The llm2vec step in its own process; ``run(k)`` -> seconds of each of k steps."""

    def __init__(
        self, py: Path, model: Path, batches: Path, args: argparse.Namespace, threads: int
    ):
        cmd = [
            str(py), str(Path(__file__).resolve().parent / "_llm2vec_peer.py"),
            "--model", str(model), "--batches", str(batches),
            "--max-length", str(args.max_length), "--threads", str(threads),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=C.REPO
        )
        line = self._line()
        if not line.startswith("READY "):
            raise RuntimeError(f"llm2vec peer did not start: {line!r}")
        self.info = json.loads(line[6:])
        self.seconds: list[float] = []
        self.loss = float("nan")

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llm2vec peer exited ({self.proc.wait()}); see its stderr above")
        return line.strip()

    def run(self, k: int) -> None:
        self.proc.stdin.write(f"run {k}\n")
        self.proc.stdin.flush()
        out = json.loads(self._line())
        self.seconds.append(sum(out["seconds"]))
        self.loss = out["loss"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------------
# llmclip
# ------------------------------------------------------------------------------------------------


def openi_metas(n: int, seed: int = 0) -> list[dict]:
    """``n`` shard-style sample metas (report sections) of real Open-I reports, shuffled."""
    from llmclip.assets import openi_reports_tgz
    from llmclip.clinical.openi import read_openi

    metas = [
        {"report": {"findings": r.findings, "impression": r.impression, "full": r.text}}
        for r in read_openi(openi_reports_tgz())
        if r.text
    ]
    random.Random(seed).shuffle(metas)
    return metas[:n]


def step_batches(metas: list[dict], enc, obj, batch: int, steps: int) -> tuple[list, list]:
    """Per step: the pairs (for the peer) and llmclip's own ``make_batch`` tensors.

    ``make_batch`` draws its pairs with ``build_pairs(metas, random.Random(seed), ...)``; the same
    call here yields the very same pairs, so both sides train on identical texts.
    """
    from llmclip.text.objectives import blank_token_id
    from llmclip.text.pairs import build_pairs
    from llmclip.text.stage1 import make_batch

    blank = blank_token_id(enc.tokenizer)
    pairs, batches = [], []
    for i in range(steps):
        group = metas[i * batch : (i + 1) * batch]
        seed = 1000 + i
        p = build_pairs(group, random.Random(seed), obj.hard_negatives, obj.summary_fraction)
        if len(p) != batch:
            raise RuntimeError(f"expected {batch} pairs, got {len(p)}")
        pairs.append(p)
        batches.append(make_batch("contrastive", group, enc, obj, seed, blank, task_seed=seed))
    return pairs, batches


def token_counts(b: dict) -> tuple[int, int]:
    """(real, padded) tokens of one contrastive batch (queries + docs, every length bucket)."""
    masks = [*b["queries"]["attention_mask"], *b["docs"]["attention_mask"]]
    return sum(int(m.sum()) for m in masks), sum(int(m.numel()) for m in masks)


def stage1_config(args: argparse.Namespace, model_dir: Path, out: Path):
    from llmclip.config import DeepSpeedSection, OptimConfig, RunConfig
    from llmclip.text.encoder import LoraSection, ModelConfig
    from llmclip.text.stage1 import ObjectiveConfig, Stage1Config

    return Stage1Config(
        run=RunConfig(out_dir=str(out), tensorboard=False),
        model=ModelConfig(
            source=str(model_dir), max_length=args.max_length, attention="sdpa", pooling="mean",
            lora=LoraSection(r=16, alpha=32, dropout=0.05),
        ),
        stage1=ObjectiveConfig(contrastive_scale=50.0, hard_negatives=1),
        optim=OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=0, max_steps=10_000),
        deepspeed=DeepSpeedSection(
            config=str(C.REPO / "ds_configs/cpu_zero3.json"), micro_batch_size=args.batch,
            precision="fp32", zero_stage=args.zero_stage,
        ),
    )  # fmt: skip


class LLMClipEngineStep:
    """Stage-1 contrastive micro-steps as ``llmclip.text.stage1.run`` takes them (DeepSpeed)."""

    def __init__(self, cfg):
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        from llmclip.text.encoder import LLMEncoder
        from llmclip.text.stage1 import Stage1Module, deepspeed_config, lr_lambda, param_groups

        C.single_rank_env()
        ds_config = deepspeed_config(cfg, 1)
        hf_ds = None
        if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (alive while loading, as in run())
        torch.manual_seed(0)
        self.encoder = LLMEncoder.build(cfg.model, torch.float32)
        module = Stage1Module(self.encoder, cfg.stage1)
        opt = torch.optim.AdamW(
            param_groups(module, cfg.optim.weight_decay), lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        )  # fmt: skip
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim))
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=opt, lr_scheduler=sched, config=ds_config
        )
        if hf_ds is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            del hf_ds
            unset_hf_deepspeed_config()
        self.loss = float("nan")

    def step(self, batch: dict) -> None:
        out = self.engine(**batch)
        self.engine.backward(out["loss"])
        self.engine.step()
        self.loss = float(out["loss"].detach())


class LLMClipPlainStep:
    """The same module and objective with a bare torch loop (no DeepSpeed engine)."""

    def __init__(self, cfg):
        from llmclip.text.encoder import LLMEncoder
        from llmclip.text.stage1 import Stage1Module, param_groups

        torch.manual_seed(0)
        self.encoder = LLMEncoder.build(cfg.model, torch.float32)
        self.module = Stage1Module(self.encoder, cfg.stage1).train()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            param_groups(self.module, cfg.optim.weight_decay), lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        )  # fmt: skip
        self.loss = float("nan")

    def step(self, batch: dict) -> None:
        out = self.module(**batch)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = float(out["loss"].detach())


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C.offline_hub()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    py = ensure_peer_venv()
    threads = C.set_threads(args.threads)
    k = args.steps

    from llmclip.text.sources import TinyLlamaSpec, build_tiny_llama

    spec = TinyLlamaSpec(
        hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 128),
        intermediate_size=max(64, args.hidden * 5 // 2 // 64 * 64),
    )  # fmt: skip
    metas = openi_metas(args.batch * k)
    with tempfile.TemporaryDirectory(prefix="llmclip-bench-s1-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny_llama(spec, str(work / "models"))
        cfg = stage1_config(args, model_dir, work / "run")
        instr = cfg.stage1.instructions
        plain = None if args.no_plain else LLMClipPlainStep(cfg)
        ours = LLMClipEngineStep(cfg)
        groups, batches = step_batches(metas, ours.encoder, cfg.stage1, args.batch, k)
        vocab = len(ours.encoder.tokenizer)
        C.set_threads(args.threads)  # DeepSpeed's CPU accelerator may have changed it
        counts = [token_counts(b) for b in batches]
        real, padded = [c[0] for c in counts], [c[1] for c in counts]
        peer_batches = [
            {
                "query": [p.query for p in g],
                "instruction": [instr[p.kind] for p in g],
                "pos": [p.positive for p in g],
                "neg": [p.negatives[0] for p in g],
            }
            for g in groups
        ]
        (work / "batches.json").write_text(json.dumps(peer_batches), encoding="utf-8")
        peer = Peer(py, model_dir, work / "batches.json", args, threads)
        try:

            def run_ours() -> None:
                for b in batches:
                    ours.step(b)

            def run_plain() -> None:
                for b in batches:
                    plain.step(b)

            runners = {"llmclip": run_ours, "llm2vec": lambda: peer.run(k)}
            if plain is not None:
                runners["llmclip (no DeepSpeed)"] = run_plain
            times = C.interleaved(runners, reps=args.reps, warmup=args.warmup)
            # The peer times its steps itself (no pipe latency); use those seconds.
            times["llm2vec"] = peer.seconds[-args.reps :]
            trainable = sum(p.numel() for p in ours.encoder.parameters() if p.requires_grad)
            losses = {"llmclip": ours.loss, "llm2vec": peer.loss}
        finally:
            peer.close()

    tokens = {"llmclip": sum(real), "llmclip (no DeepSpeed)": sum(real)}
    tokens["llm2vec"] = sum(peer.info["real_tokens"])
    pads = {"llmclip": sum(padded), "llmclip (no DeepSpeed)": sum(padded)}
    pads["llm2vec"] = sum(peer.info["padded_tokens"])
    base_tok = tokens["llm2vec"] / C.median(times["llm2vec"])
    rows = []
    for name, ts in times.items():
        med = C.median(ts)
        rows.append([
            name, k / med, tokens[name] / med, f"{100 * tokens[name] / pads[name]:.0f}%",
            f"±{100 * C.spread(ts):.0f}%", (tokens[name] / med) / base_tok,
        ])  # fmt: skip
    print(
        f"stage-1 contrastive step: tiny Llama {args.layers} x {args.hidden} "
        f"(vocab {vocab}), LoRA r16 ({trainable / 1e6:.2f}M trainable), batch {args.batch} "
        f"triples, <= {args.max_length} tokens, fp32, {threads} threads, {args.reps} reps x {k} steps"
    )
    print(f"peer: llm2vec in {VENV.relative_to(C.REPO)} ({peer.info['versions']})")
    print(C.table(["contender", "steps/s", "tokens/s", "real/padded", "noise", "vs llm2vec"], rows))
    print(f"final losses: llmclip {losses['llmclip']:.3f}, llm2vec {losses['llm2vec']:.3f}")
    ratio = C.paired_ratio(
        [t / tokens["llm2vec"] for t in times["llm2vec"]],
        [t / tokens["llmclip"] for t in times["llmclip"]],
    )
    result = {"benchmark": "stage1_step", "args": vars(args), "threads": threads,
              "median_s": {n: C.median(v) for n, v in times.items()}, "tokens": tokens,
              "ratio_tokens_per_s_vs_llm2vec": ratio}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"RATIO llmclip stage-1 step vs llm2vec: {ratio:.2f}x tokens/s [target >= 1.0x]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
