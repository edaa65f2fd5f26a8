"""Stage-1 step, tokens/s: llmclip's shipped CPU recipe vs the llm2vec package, and MNTP peak memory.

    python benchmarks/stage1_step.py                     # configs/stage1/demo.yaml, its model shape
    python benchmarks/stage1_step.py --precision fp32    # both sides in fp32 instead of the recipe's
    python benchmarks/stage1_step.py --zero-stage 3 --plain

The model is the recipe's own shape (SmolLM2-135M cut to 4 layers: 576 wide, 9 heads, 3 KV heads,
SwiGLU 1536, tied 49,152-token vocabulary, the real SmolLM2 tokenizer) with random weights, saved
once to a temporary folder: speed does not depend on the weights' values. Both sides train the
recipe's LoRA (r, alpha, dropout on q,k,v,o,gate,up,down) with bidirectional sdpa attention, mean
pooling over the report tokens (instruction excluded), InfoNCE at the recipe's scale with its hard
negatives per query, AdamW, gradient-norm clip 1.0, in the recipe's precision (``auto``: bf16
autocast on a CPU with AMX-BF16 or AVX512-BF16, else fp32; the peer gets the same autocast; llmclip
runs its attention kernel in fp32 inside it, as the recipe's ``autocast_attention`` says), on the
same batches of
real Open-I report pairs built by ``llmclip.text.pairs.build_pairs``:

- ``llmclip``: what ``llmclip/train.py`` runs for stage 1 -- ``LLMEncoder.build`` +
  ``Stage1Module`` (contrastive objective) under a DeepSpeed engine with the recipe's DeepSpeed JSON,
  on the tensors of ``llmclip.text.stage1_batch.make_batch`` (queries and documents sharing the
  recipe's ``length_buckets``, one forward each); ``--plain`` adds the same module in a bare torch loop (what the engine costs);
- ``llm2vec``: llm2vec 0.2.3's supervised step (see ``_llm2vec_peer.py``), in its own venv
  (``.bench-venv/llm2vec``, created here on first use: llm2vec pins transformers 4.44), in a
  subprocess that exchanges only numbers (JSON) with this one.

Tokenisation is data-loader work on both sides and is not timed. Repetitions are interleaved in
rotating order; the ratio is median seconds of the peer over median seconds of llmclip for the same
pairs, i.e. the ratio of median tokens/s with the tokens counted once (llmclip's tokenizer, non-padding
query + positive + hard negatives) for both. Both encode the real one-error edits only: the masked
filler slots of reports with fewer edits than ``hard_negatives`` are left out of llmclip's forward and
are not handed to the peer (``--with-fillers`` adds a row that encodes them, to time what that
saves). FLOPs of one llmclip step are counted by PyTorch's ``FlopCounterMode`` and set against a
same-run GEMM peak (``torch.matmul`` at the decoder's own linear shapes, same threads and dtype).
Last, the MNTP step's peak memory (resident set above the step's start, each run in a fresh
process) with the chunked cross-entropy vs the materialised logits, at the recipe's vocabulary
(``_mntp_memory.py``; the pipe to the llm2vec process is ``_llm2vec_client.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402
from _llm2vec_client import VENV, Peer, ensure_peer_venv  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(C.REPO / "configs/stage1/demo.yaml"),
                   help="the stage-1 recipe measured (default: the shipped CPU recipe)")
    p.add_argument("--hidden", type=int, default=576, help="model width (recipe: SmolLM2-135M)")
    p.add_argument("--layers", type=int, default=4, help="model depth (recipe: keep_layers 4)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=0,
                   help="embedding rows (0 = the SmolLM2 tokenizer's 49,152; 128256 = Llama 3's)")
    p.add_argument("--batch", type=int, default=0, help="triples per step (0 = the recipe's micro-batch)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per timed repetition")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help=C.THREADS_HELP)
    p.add_argument("--plain", action="store_true", help="add the no-DeepSpeed llmclip row")
    p.add_argument("--with-fillers", action="store_true",
                   help="add a llmclip row that also encodes the masked filler negatives (as before "
                   "they were left out of the forward): what leaving them out saves")
    p.add_argument("--zero-stage", type=int, default=None, choices=(0, 1, 2, 3),
                   help="override the recipe's ZeRO stage")
    p.add_argument("--precision", default=None, choices=("auto", "fp32", "bf16", "bf16-autocast"),
                   help="override the recipe's precision (applied to both sides)")
    p.add_argument("--mntp-reports", type=int, default=64, help="reports of the MNTP memory step")
    p.add_argument("--mntp-reps", type=int, default=3, help="fresh processes per MNTP variant")
    p.add_argument("--skip-mntp", action="store_true", help="skip the MNTP memory comparison")
    p.add_argument("--mntp-no-ckpt", action="store_true",
                   help="MNTP memory without gradient checkpointing (default: with, as the GPU "
                        "recipes train, where activations no longer hide the logits)")
    p.add_argument("--only-mntp", action="store_true", help="only the MNTP memory comparison")
    p.add_argument("--mntp-child", default="", help=argparse.SUPPRESS)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# llmclip
# ------------------------------------------------------------------------------------------------


def openi_metas(n: int, seed: int = 0) -> list[dict]:
    """``n`` shard-style sample metas (report sections) of real Open-I reports, shuffled."""
    from llmclip.assets import openi_reports_tgz
    from llmclip.labels.openi import read_openi

    metas = [
        {"report": {"findings": r.findings, "impression": r.impression, "full": r.text}}
        for r in read_openi(openi_reports_tgz())
        if r.text
    ]
    random.Random(seed).shuffle(metas)
    return metas[:n]


def step_batches(metas: list[dict], enc, obj, batch: int, steps: int) -> tuple[list, list]:
    """Per step: the pairs (for the peer) and llmclip's own ``make_batch`` tensors.

    ``make_batch`` draws its pairs with ``build_pairs(metas, random.Random(seed), H,
    summary_share(obj, task_seed))``; the same call here yields the very same pairs (and, with the
    recipe's ``task_batches``, the same pair type for the step), so both sides train on identical
    texts. ``main`` checks that both tokenizers see texts of about the same length.
    """
    from llmclip.text.objectives import blank_token_id
    from llmclip.text.pairs import build_pairs
    from llmclip.text.stage1_batch import make_batch, summary_share

    blank = blank_token_id(enc.tokenizer)
    pairs, batches = [], []
    for i in range(steps):
        group = metas[i * batch : (i + 1) * batch]
        seed = 1000 + i
        p = build_pairs(group, random.Random(seed), obj.hard_negatives, summary_share(obj, seed))
        if len(p) != batch:
            raise RuntimeError(f"expected {batch} pairs, got {len(p)}")
        pairs.append(p)
        batches.append(make_batch("contrastive", group, enc, obj, seed, blank, task_seed=seed))
    return pairs, batches


def peer_tokens(peer_batches: list[dict], tokenizer) -> list[int]:
    """Tokens of each peer batch's texts (instruction + query, positive, negatives) by llmclip's
    tokenizer: a check that both sides got the same texts."""
    def n(t: str) -> int:
        return len(tokenizer(t)["input_ids"])

    return [sum(n(f"{i} {q}") for i, q in zip(b["instruction"], b["query"], strict=True))
            + sum(n(t) for t in b["pos"] + b["neg"]) for b in peer_batches]


def with_fillers(pairs: list, batch: dict, enc, obj) -> dict:
    """``batch`` with every hard-negative slot encoded, masked fillers included (the step before
    ``encoded_negatives``): the same loss, more tokens."""
    from llmclip.text.stage1_batch import contrastive_texts

    every = [True] * batch["neg_rows"].numel()
    return dict(batch, texts=contrastive_texts(pairs, every, enc, obj),
                neg_rows=torch.ones_like(batch["neg_rows"]))


def token_counts(b: dict) -> tuple[int, int]:
    """(real, padded) tokens of one contrastive batch (queries + docs, every length bucket)."""
    masks = b["texts"]["attention_mask"]
    return sum(int(m.sum()) for m in masks), sum(int(m.numel()) for m in masks)


def stage1_config(args: argparse.Namespace, model_dir: Path, out: Path):
    """The recipe of ``--config`` with the model folder, output and any overrides swapped in."""
    from llmclip.config import load_config
    from llmclip.text.stage1_config import Stage1Config

    cfg = load_config(Stage1Config, args.config)
    cfg.run.out_dir, cfg.run.tensorboard = str(out), False
    cfg.model.source, cfg.model.keep_layers = str(model_dir), 0
    cfg.model.attention = "sdpa"
    cfg.optim.warmup_steps, cfg.optim.max_steps = 0, 10_000
    if not Path(cfg.deepspeed.config).is_absolute():
        cfg.deepspeed.config = str(C.REPO / cfg.deepspeed.config)
    if args.zero_stage is not None:
        cfg.deepspeed.zero_stage = args.zero_stage
    if args.precision:
        cfg.deepspeed.precision = args.precision
    if args.batch:
        cfg.deepspeed.micro_batch_size = args.batch
    return cfg


def autocast(cfg) -> bool:
    from llmclip.text.stage1 import precision

    return precision(cfg.deepspeed) == "bf16-autocast"


class LLMClipEngineStep:
    """Stage-1 contrastive micro-steps as ``llmclip.text.stage1.run`` takes them (DeepSpeed).

    ``leaf``: the ZeRO-3 fetch unit (``mark_zero3_leaves``; ``zero3_fetch.py``), ``zero_opts``
    merged into the JSON's ``zero_optimization``."""

    def __init__(self, cfg, leaf: str = "none", zero_opts: dict | None = None):
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        from llmclip.config import lr_factor
        from llmclip.ds_config import mark_zero3_leaves
        from llmclip.text.encoder import LLMEncoder
        from llmclip.text.stage1 import Stage1Module, deepspeed_config, param_groups

        C.single_rank_env()
        ds_config = deepspeed_config(cfg, 1)
        ds_config["zero_optimization"].update(zero_opts or {})
        hf_ds = None
        if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (alive while loading, as in run())
        from llmclip.text.stage1 import use_bf16

        torch.manual_seed(0)
        self.encoder = LLMEncoder.build(cfg.model, torch.bfloat16 if use_bf16(cfg.deepspeed) else torch.float32)
        module = Stage1Module(self.encoder, cfg.stage1, autocast=autocast(cfg),
                              autocast_attention=cfg.deepspeed.autocast_attention)
        self.leaves = mark_zero3_leaves(module, leaf, ds_config)
        opt = torch.optim.AdamW(
            param_groups(module, cfg.optim.weight_decay), lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        )  # fmt: skip
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.optim))
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
        self.module = Stage1Module(self.encoder, cfg.stage1, autocast=autocast(cfg),
                              autocast_attention=cfg.deepspeed.autocast_attention).train()
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


def model_spec(args: argparse.Namespace):
    from llmclip.text.sources import TinyLlamaSpec

    return TinyLlamaSpec(hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         intermediate_size=args.intermediate, vocab_size=args.vocab)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(C.REPO)
    C.offline_hub()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from _mntp_memory import mntp_child, mntp_memory

    if args.mntp_child:
        return mntp_child(args)
    if args.only_mntp:
        C.write_json(args.json, {"benchmark": "stage1_step", "mntp_memory": mntp_memory(args)})
        return 0
    py = ensure_peer_venv()
    threads = C.set_threads(args.threads)
    k = args.steps

    from llmclip.text.sources import build_tiny_llama
    from llmclip.text.stage1 import precision
    from llmclip.text.stage1_batch import negatives_to_encode

    with tempfile.TemporaryDirectory(prefix="llmclip-bench-s1-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny_llama(model_spec(args), str(work / "models"))
        cfg = stage1_config(args, model_dir, work / "run")
        batch, mode = cfg.deepspeed.micro_batch_size, precision(cfg.deepspeed)
        metas = openi_metas(batch * k)
        instr = cfg.stage1.instructions
        plain = LLMClipPlainStep(cfg) if args.plain else None
        ours = LLMClipEngineStep(cfg)
        zero = ours.engine.zero_optimization_stage()
        groups, batches = step_batches(metas, ours.encoder, cfg.stage1, batch, k)
        vocab = len(ours.encoder.tokenizer)
        C.set_threads(args.threads)  # DeepSpeed's CPU accelerator may have changed it
        counts = [token_counts(b) for b in batches]
        real, padded = sum(c[0] for c in counts), sum(c[1] for c in counts)
        # The peer encodes the same documents: the real edits, not the masked filler slots that
        # llmclip leaves out of the forward (``stage1_batch.encoded_negatives``).
        peer_batches = [{"query": [p.query for p in g], "instruction": [instr[p.kind] for p in g],
                         "pos": [p.positive for p in g], "neg": negatives_to_encode(g, b["neg_rows"].tolist())}
                        for g, b in zip(groups, batches, strict=True)]
        # Same texts on both sides: the two tokenizers' counts differ only by special tokens.
        for c, theirs in zip(counts, peer_tokens(peer_batches, ours.encoder.tokenizer), strict=True):
            if abs(c[0] - theirs) > 0.05 * c[0]:
                raise RuntimeError(f"llmclip and the peer see different texts: {c[0]} vs {theirs} tokens")
        (work / "batches.json").write_text(json.dumps(peer_batches), encoding="utf-8")
        peer = Peer(py, model_dir, work / "batches.json", args, threads, cfg, mode == "bf16-autocast")
        try:
            runners = {"llmclip": lambda: [ours.step(b) for b in batches], "llm2vec": lambda: peer.run(k)}
            if plain is not None:
                runners["llmclip (no DeepSpeed)"] = lambda: [plain.step(b) for b in batches]
            if args.with_fillers:
                full = [with_fillers(g, b, ours.encoder, cfg.stage1) for g, b in zip(groups, batches, strict=True)]
                runners["llmclip (fillers encoded)"] = lambda: [ours.step(b) for b in full]
            times = C.interleaved(runners, reps=args.reps, warmup=args.warmup)
            # The peer times its steps itself (no pipe latency); use those seconds.
            times["llm2vec"] = peer.seconds[-args.reps:]
            flops = C.count_flops(lambda: [ours.step(b) for b in batches])
            rows_per_forward = padded // (k * cfg.stage1.length_buckets)  # one forward per bucket
            dtype = torch.float32 if mode == "fp32" else torch.bfloat16
            shapes = C.linear_shapes(ours.encoder.decoder, rows_per_forward, skip=("lora_", "lm_head"))
            peak = C.gemm_peak(shapes, dtype)
            trainable = sum(p.numel() for p in ours.encoder.parameters() if p.requires_grad)
            losses = {"llmclip": ours.loss, "llm2vec": peer.loss}
        finally:
            peer.close()

    rows = []
    for name, ts in times.items():
        med = C.median(ts)
        rows.append([name, k / med, real / med, f"±{100 * C.spread(ts):.0f}%",
                     C.median(times["llm2vec"]) / med])
    print(f"stage-1 contrastive step, recipe {Path(args.config).name}: Llama {args.layers} x "
          f"{args.hidden} (vocab {vocab}), LoRA r{cfg.model.lora.r} ({trainable / 1e6:.2f}M "
          f"trainable), {batch} queries x (1 + {cfg.stage1.hard_negatives}) documents, <= "
          f"{cfg.model.max_length} tokens, {mode}, ZeRO-{zero}, {threads} threads, {args.reps} reps "
          f"x {k} steps; {real} real tokens per repetition ({100 * real / padded:.0f}% of padded)")
    print(f"peer: llm2vec in {VENV.relative_to(C.REPO)} ({peer.info['versions']}); its own "
          f"tokenizer counts {sum(peer.info['real_tokens'][:k])} real tokens for the same pairs")
    print(C.table(["contender", "steps/s", "tokens/s", "noise", "vs llm2vec"], rows))
    print(f"final losses: llmclip {losses['llmclip']:.3f}, llm2vec {losses['llm2vec']:.3f}")
    achieved = flops / C.median(times["llmclip"])
    print(f"llmclip step: {flops / k / 1e9:.1f} GFLOP per step (FlopCounterMode), "
          f"{achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of the same-run "
          f"{str(dtype).split('.')[-1]} GEMM peak at the decoder's shapes ({peak / 1e9:.1f} GFLOP/s)")
    ratio = C.ratio_of_medians(times["llmclip"], times["llm2vec"])
    result = {"benchmark": "stage1_step", "args": vars(args), "threads": threads, "precision": mode,
              "zero_stage": zero, "seconds": times, "real_tokens_per_rep": real,
              "padded_tokens_per_rep": padded, "peer_real_tokens": peer.info["real_tokens"][:k],
              "ratio_tokens_per_s_vs_llm2vec": ratio.as_dict(), "flops_per_rep": flops,
              "gemm_peak_flops": peak, "gemm_fraction": achieved / peak}
    if args.with_fillers:
        saved = C.ratio_of_medians(times["llmclip"], times["llmclip (fillers encoded)"])
        extra = sum(token_counts(b)[0] for b in full) - real
        print(f"masked filler negatives left out of the forward: {extra} fewer real tokens per "
              f"repetition ({100 * extra / (real + extra):.1f}%), {saved.value:.2f}x the step's "
              f"speed (IQR {saved.q1:.2f}-{saved.q3:.2f}, min-max {saved.lo:.2f}-{saved.hi:.2f})")
        result["filler_tokens_per_rep"] = extra
        result["ratio_vs_fillers_encoded"] = saved.as_dict()
    if not args.skip_mntp:
        result["mntp_memory"] = mntp_memory(args)
    C.write_json(args.json, result)
    print(C.verdict("llmclip stage-1 recipe vs llm2vec 0.2.3 (tokens/s)", ratio, 1.3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
