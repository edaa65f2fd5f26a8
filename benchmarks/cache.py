"""Cache builder vs sentence-transformers ``encode()``: reports/s, same decoder, real Open-I reports.

Both sides embed the report column (findings + impression) of the Open-I text shards: the 3,955
real reports shipped in torchxrayvision (3,927 have a findings or impression section), 256 per
shard, their real token lengths. Same decoder weights (SmolLM2-135M, first 4 layers, by default),
tokenizer, max length (512), compute dtype and torch threads on both sides; both mean-pool the same
tokens (the report tokens of ``[bos] report``: the BOS state is left out of the mean).

- **llmclip** (ours): ``llmclip.cache.build.build_cache``, the function ``llmclip cache build`` runs
  on every rank, into a fresh folder: read the text shards, collect each shard's distinct texts,
  sort them by token length, encode them in token-budget batches
  (``LLMEncoder.encode``: 2048 tokens at most on a CPU), write the ``.emb.npy`` + ``.keys.json``
  sidecars and ``meta.json``. All of that is timed.
- **sentence-transformers** (peer): ``SentenceTransformer([Transformer(decoder folder),
  Pooling(mean, include_prompt=False)]).encode(texts, prompt=BOS, batch_size=32)`` (its own
  length sort and batching) on exactly the texts the builder encodes (the distinct texts, already
  in memory); sentence-transformers loads the decoder itself from the saved folder, as plain text
  (no chat template), made bidirectional as ``LLMEncoder.from_dir`` makes it. Only ``encode()`` is
  timed: no shard read, no file written.

Repetitions are interleaved (rotating order); the headline is the ratio of median reports/s. The
embeddings of the two sides are compared (max relative difference, min cosine). Achieved FLOP/s
count the forward FLOPs of the real tokens (per layer 2 x linear weights x tokens + 4 x t^2 x
heads x head_dim of attention, the same count for both sides; no LM head runs on either side) over a
same-run GEMM peak at the decoder's own linear shapes, in the same threads and dtype.

    python benchmarks/cache.py                           # SmolLM2-135M, 4 layers, bf16, 5 reps
    python benchmarks/cache.py --precision fp32 --reps 3
    python benchmarks/cache.py --model tiny --reports 512 --reps 2   # quick check
    python benchmarks/cache.py --profile                 # + where the builder's time goes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def openi_text_shards(work: Path, reports: int | None) -> Path:
    """Text-only shards of the Open-I reports (built once under ``work``)."""
    from llmclip.data.build import build
    from llmclip.data.build_options import BuildOptions

    out = work / f"openi-text-{reports or 'all'}"
    if not (out / "manifest.json").exists():
        build(
            BuildOptions(source="openi", out=str(out), maxcount=reports, shard_size=256, workers=1),
            progress=False,
        )
    return out


def encoder_dir(work: Path, model: str, keep_layers: int) -> Path:
    """An encoder dir of a pretrained decoder without stage-1 training (``smollm2`` = the real
    SmolLM2-135M weights, first ``keep_layers`` layers; ``tiny`` = the test encoder's shape)."""
    from llmclip.text.encoder import LLMEncoder
    from llmclip.text.export import save_encoder_dir
    from llmclip.text.model_config import ModelConfig

    out = work / f"encoder-{model}-{keep_layers}"
    if (out / "encoder.json").exists():
        return out
    source = {"tiny": "tiny:llama", "smollm2": "asset:smollm2-135m"}[model]
    cfg = ModelConfig(source=source, keep_layers=keep_layers, max_length=512)
    enc = LLMEncoder.build(cfg, torch.float32, lora=False)
    return save_encoder_dir(out, enc.decoder, enc.tokenizer, enc.pooler, pooling="mean",
                            max_length=cfg.max_length, dtype="float32")


def sentence_transformer(enc_dir: Path, enc, dtype: torch.dtype):
    """sentence-transformers over the saved decoder folder: plain-text input (no chat template),
    mean pooling without the prompt, the prompt being llmclip's BOS prefix."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from llmclip.text.attention import make_bidirectional

    class BosPromptTransformer(Transformer):
        # ST measures a prompt without its trailing special token, so a prompt that *is* the BOS
        # token counts 0 tokens and Pooling(include_prompt=False) would average the BOS state in.
        def _get_prompt_length(self, prompt, **kwargs):
            n = super()._get_prompt_length(prompt, **kwargs)
            return 1 if prompt == self.tokenizer.bos_token else n

    tr = BosPromptTransformer(
        str(enc_dir / "model"),
        tokenizer_name_or_path=str(enc_dir / "tokenizer"),
        max_seq_length=enc.max_length,
        model_kwargs={"dtype": dtype, "attn_implementation": enc.decoder.config._attn_implementation},
        modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        module_output_name="token_embeddings",
    )
    make_bidirectional(tr.auto_model)  # as LLMEncoder.from_dir loads the same folder
    pool = Pooling(enc.dim, pooling_mode="mean", include_prompt=False)
    return SentenceTransformer(modules=[tr, pool], device="cpu")


def forward_flops(decoder, lengths: list[int]) -> float:
    """Forward FLOPs of the decoder on sequences of these real lengths (no padding counted)."""
    cfg = decoder.config
    layers = int(cfg.num_hidden_layers)
    per_layer = sum(m.weight.numel() for m in decoder.layers[0].modules()
                    if isinstance(m, torch.nn.Linear))
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    width = int(cfg.num_attention_heads) * head_dim
    t = np.asarray(lengths, dtype=np.float64)
    return float(layers * (2.0 * per_layer * t.sum() + 4.0 * width * (t**2).sum()))


def time_split(enc, texts: list[str], batch_tokens: int, peak: float) -> dict[str, float]:
    """Where one builder encode's time goes (torch profiler, self CPU time per op): the matmuls
    (``aten::mm``/``addmm``, their FLOPs from the recorded shapes), the attention kernel
    (``scaled_dot_product*``) and everything else; and the most a builder doing the same matmuls
    could gain, were every other op free and the matmuls at the same-run GEMM peak."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        enc.encode(texts, batch_tokens=batch_tokens)
    total = mm = attn = mm_flops = 0.0
    for e in prof.events():
        us = e.self_cpu_time_total
        total += us
        if e.name in ("aten::mm", "aten::addmm"):
            mm += us
            a, b = [s for s in e.input_shapes if len(s) == 2][-2:]
            mm_flops += 2.0 * a[0] * a[1] * b[1]
        elif "scaled_dot_product" in e.name:
            attn += us
    mm_s = mm / 1e6
    return {"seconds": total / 1e6, "matmul_share": mm / total, "attention_share": attn / total,
            "other_share": 1 - (mm + attn) / total, "matmul_flops": mm_flops,
            "matmul_flop_per_s": mm_flops / mm_s,
            "matmul_peak_fraction": mm_flops / mm_s / peak,
            "ceiling": (total / 1e6) / (mm_flops / peak)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", default=None, help="an encoder dir (default: build --model)")
    p.add_argument("--model", default="smollm2", choices=["tiny", "smollm2"])
    p.add_argument("--keep-layers", type=int, default=None,
                   help="first N layers of --model (0 = all; default 4 of SmolLM2's 30, tiny: all)")
    p.add_argument("--reports", type=int, default=None, help="first N Open-I reports (default all)")
    p.add_argument("--precision", default="bf16", choices=list(DTYPES),
                   help="compute dtype of both sides (the builder's --precision)")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="builder token budget (`llmclip cache build` default; capped on a CPU)")
    p.add_argument("--compile", action="store_true",
                   help="builder with BuildOptions(compile=True): torch.compile'd decoder (the "
                   "compile is warm-up, timed apart; sentence-transformers stays eager)")
    p.add_argument("--st-batch", type=int, default=32, help="encode() batch_size (ST default)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed runs, profile one builder encode: the share of matmuls, "
                   "attention and the rest, and the most a builder doing the same matmuls could gain")
    p.add_argument("--threads", type=int, default=1, help=C.THREADS_HELP)
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    p.add_argument("--work", default=".assets/bench-cache", help="shards/encoders/caches folder")
    p.add_argument("--json", default=None, help="write every repetition here")
    args = p.parse_args()
    C.offline_hub()
    threads = C.set_threads(args.threads)
    dtype = DTYPES[args.precision]

    from llmclip.cache import EmbeddingCache
    from llmclip.cache.build import CPU_BATCH_TOKENS, BuildOptions, build_cache
    from llmclip.cache.texts import VARIANTS, read_reports
    from llmclip.data.shards import resolve_shards
    from llmclip.text.encoder import LLMEncoder

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards_dir = openi_text_shards(work, args.reports)
    shards = resolve_shards(str(shards_dir), "text")
    if args.keep_layers is None:
        args.keep_layers = 4 if args.model == "smollm2" else 0
    enc_dir = Path(args.encoder) if args.encoder else encoder_dir(work, args.model, args.keep_layers)
    enc = LLMEncoder.from_dir(enc_dir, dtype=dtype)
    st = sentence_transformer(enc_dir, enc, dtype)
    bos = enc.tokenizer.bos_token

    # The builder encodes each shard's distinct texts once; the peer gets exactly those texts.
    keys, texts, n_reports = {}, [], 0
    for s in shards:
        keys[s.name] = [(k, VARIANTS["report"](r)) for k, r in read_reports(s.path)]
        n_reports += len(keys[s.name])
        texts += list(dict.fromkeys(t for _, t in keys[s.name]))
    bodies = enc.tokenizer(texts, add_special_tokens=False)["input_ids"]
    lengths = [min(len(b) + 1, enc.max_length) for b in bodies]  # + BOS, truncated like both sides
    flops = forward_flops(enc.decoder, lengths)
    n_params = sum(q.numel() for q in enc.parameters())
    print(f"encoder {enc_dir} ({n_params / 1e6:.1f}M params, {enc.decoder.config.num_hidden_layers} "
          f"layers, dim {enc.dim}), {args.precision}, {threads} thread(s), "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"Open-I: {n_reports} reports in {len(shards)} shards, {len(texts)} distinct texts "
          f"encoded per build; tokens per text: median {int(np.median(lengths))}, p90 "
          f"{int(np.percentile(lengths, 90))}, max {max(lengths)}; {flops / 1e12:.2f} TFLOP per build")

    root = work / "cache-runs"
    shutil.rmtree(root, ignore_errors=True)
    runs = iter(range(10**6))
    out: dict[str, object] = {}

    def builder() -> None:
        folder = root / f"run-{next(runs)}"
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # per-shard lines
            build_cache(BuildOptions(encoder=str(enc_dir), shards=str(shards_dir), out=str(folder),
                                     variants=["report"], batch_tokens=args.batch_tokens,
                                     precision=args.precision, compile=args.compile,
                                     progress=False), encoder=enc)
        out["cache"] = folder

    def peer() -> None:
        out["st"] = st.encode(texts, prompt=bos, batch_size=args.st_batch, convert_to_numpy=True)

    enc.encode(texts[:8])  # warm-up: kernels, tokenizer, page faults (both sides, untimed)
    st.encode(texts[:8], prompt=bos, batch_size=args.st_batch)
    compile_s = None
    if args.compile:  # compiles once per process: a whole build, untimed, timed apart
        t0 = time.perf_counter()
        builder()
        compile_s = time.perf_counter() - t0
        print(f"builder warm-up build with torch.compile: {compile_s:.1f} s (excluded)")
    names = {"llmclip": "llmclip cache build" + (" (compiled)" if args.compile else ""),
             "st": "sentence-transformers encode()"}
    times = C.interleaved({"llmclip": builder, "st": peer}, reps=args.reps, warmup=0)

    # Agreement: the cache's fp16 rows against the peer's embeddings of the same texts.
    cache = EmbeddingCache(out["cache"])
    row = {t: i for i, t in enumerate(texts)}
    st_emb = np.asarray(out["st"], dtype=np.float32)
    ours = np.concatenate([cache.array(n)[:, 0].astype(np.float32) for n in keys])
    theirs = st_emb[[row[t] for n in keys for _, t in keys[n]]]
    diff = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    cos = float(np.min((ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1)
                                                   * np.linalg.norm(theirs, axis=1))))
    shutil.rmtree(root, ignore_errors=True)

    budget = min(args.batch_tokens, CPU_BATCH_TOKENS)
    peak = C.gemm_peak(C.linear_shapes(enc.decoder, budget), dtype)
    rows, stats = [], {}
    for k, label in names.items():
        sec = C.median(times[k])
        stats[k] = {"seconds": times[k], "reports_per_s": [n_reports / x for x in times[k]],
                    "median_reports_per_s": n_reports / sec, "flop_per_s": flops / sec,
                    "peak_fraction": flops / sec / peak}
        rows.append([label, n_reports / sec, f"±{C.spread(times[k]):.0%}", sec,
                     flops / sec / 1e9, f"{flops / sec / peak:.0%}"])
    print(C.table(["side", "reports/s", "spread", "median s", "GFLOP/s", "of GEMM peak"], rows))
    print(f"GEMM peak at the decoder's linear shapes ({budget} tokens, {args.precision}, "
          f"{threads} thread(s)): {peak / 1e9:.1f} GFLOP/s")
    print(f"llmclip: build_cache(variants=report, batch_tokens={args.batch_tokens} -> {budget} "
          f"on CPU), shards read + sidecars written; sentence-transformers: encode("
          f"batch_size={args.st_batch}) of the same {len(texts)} texts, nothing read or written")
    print(f"embeddings agree: max relative difference {diff:.1e} (fp16 cache rows vs "
          f"{args.precision} ST), min cosine {cos:.5f}")
    split = None
    if args.profile:  # untimed: the profiler's own overhead inflates the small ops a little
        split = time_split(enc, texts, budget, peak)
        print(f"builder's time (profiled encode, {split['seconds']:.1f} s of op time): matmuls "
              f"{split['matmul_share']:.0%} at {split['matmul_peak_fraction']:.0%} of the GEMM peak, "
              f"attention kernel {split['attention_share']:.0%}, everything else "
              f"{split['other_share']:.0%}; with every other op free and the matmuls at the peak "
              f"the builder would be at most {split['ceiling']:.2f}x its own speed, while the peer "
              "runs the same matmuls")
    r = C.ratio_of_medians(times["llmclip"], times["st"])
    C.write_json(args.json, {
        "args": vars(args), "threads": threads, "encoder": str(enc_dir), "reports": n_reports,
        "texts": len(texts), "flops_per_build": flops, "gemm_peak": peak, "gemm_tokens": budget,
        "compile_warmup_s": compile_s, "max_rel_diff": diff, "min_cosine": cos, "sides": stats,
        "ratio": r.as_dict(), "time_split": split,
    })
    print(C.verdict("cache builder vs sentence-transformers encode()", r, 1.3))


if __name__ == "__main__":
    main()
