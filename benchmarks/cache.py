"""Cache builder vs the naive extractor: reports/s with the same encoder on real Open-I reports.

The naive peer is how LLM2CLIP's extraction script embeds captions: samples in shard order, fixed
batches of 32, each padded to its longest text, one forward per batch. The builder is
``llmclip.cache_build.build_cache``: every shard's texts sorted by length, token-budget batches,
sidecars written atomically. Both read the same Open-I text shards (the 3,955 real reports shipped
in torchxrayvision, their real length distribution), run the same loaded encoder with the same
threads, and embed the report column; the script checks they agree and prints the ratio.

    python benchmarks/cache.py                         # tiny test encoder (2-layer Llama)
    python benchmarks/cache.py --model smollm2 --keep-layers 8 --reports 1000
    python benchmarks/cache.py --encoder runs/stage1/demo/final
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

NAIVE_BATCH = 32


def openi_text_shards(work: Path, reports: int | None) -> Path:
    """Text-only shards of the Open-I reports (built once under ``work``)."""
    from llmclip.data.build import BuildOptions, build

    out = work / f"openi-text-{reports or 'all'}"
    if not (out / "manifest.json").exists():
        build(
            BuildOptions(source="openi", out=str(out), maxcount=reports, shard_size=256, workers=1),
            progress=False,
        )
    return out


def untrained_encoder_dir(work: Path, model: str, keep_layers: int) -> Path:
    """An encoder dir of an untrained model (``tiny`` = the test encoder's shape, or SmolLM2-135M)."""
    from llmclip.text.encoder import LLMEncoder, ModelConfig
    from llmclip.text.export import save_encoder_dir

    out = work / f"encoder-{model}-{keep_layers}"
    if (out / "encoder.json").exists():
        return out
    source = {"tiny": "tiny:llama", "smollm2": "asset:smollm2-135m"}[model]
    cfg = ModelConfig(source=source, keep_layers=keep_layers, max_length=512)
    enc = LLMEncoder.build(cfg, torch.float32, lora=False)
    return save_encoder_dir(
        out,
        enc.decoder,
        enc.tokenizer,
        enc.pooler,
        pooling="mean",
        max_length=cfg.max_length,
        dtype="float32",
    )


def naive_extract(enc, shards) -> tuple[dict[str, np.ndarray], float, int, int, int]:
    """(rows per shard, seconds, reports, real tokens, padded tokens) of fixed batches of 32."""
    from llmclip.cache_build import read_reports

    out, n, real, padded = {}, 0, 0, 0
    device = next(enc.parameters()).device
    start = time.perf_counter()
    for s in shards:
        texts = [r["full"].strip() for _, r in read_reports(s.path)]
        rows = []
        for i in range(0, len(texts), NAIVE_BATCH):
            batch = enc.tokenize(
                texts[i : i + NAIVE_BATCH], getattr(enc, "instruction", None), device=device
            )
            with torch.inference_mode():
                rows.append(enc(**batch).float().cpu().numpy())
            real += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
        out[s.name] = np.concatenate(rows)
        n += len(texts)
    return out, time.perf_counter() - start, n, real, padded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--encoder", default=None, help="an encoder dir (default: build an untrained --model)"
    )
    p.add_argument(
        "--model", default="tiny", choices=["tiny", "smollm2"], help="untrained model to build"
    )
    p.add_argument("--keep-layers", type=int, default=0, help="first N layers of --model (0 = all)")
    p.add_argument(
        "--reports", type=int, default=None, help="first N Open-I reports (default: all)"
    )
    p.add_argument("--batch-tokens", type=int, default=4096, help="builder token budget")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each, best time kept")
    p.add_argument(
        "--work", default=".assets/bench-cache", help="folder for shards/encoders/caches"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from llmclip.cache import EmbeddingCache
    from llmclip.cache_build import BuildOptions, build_cache, read_reports
    from llmclip.data.shards import resolve_shards
    from llmclip.text.encoder import LLMEncoder

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards_dir = openi_text_shards(work, args.reports)
    shards = resolve_shards(str(shards_dir), "text")
    enc_dir = (
        Path(args.encoder)
        if args.encoder
        else untrained_encoder_dir(work, args.model, args.keep_layers)
    )
    enc = LLMEncoder.from_dir(enc_dir)
    enc.encode(["warm up the kernels", "and the tokenizer"])
    texts = [r["full"] for s in shards for _, r in read_reports(s.path)]
    lengths = [len(ids) for ids in enc.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    print(
        f"encoder {enc_dir} (dim {enc.dim}, {sum(p.numel() for p in enc.parameters()) / 1e6:.1f}M params), "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"Open-I reports: {len(lengths)} in {len(shards)} shards; tokens per report: median "
        f"{int(np.median(lengths))}, p90 {int(np.percentile(lengths, 90))}, max {max(lengths)}"
    )

    best_b, best_n = float("inf"), float("inf")
    for _ in range(args.repeat):
        cache_dir = work / "cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        res = build_cache(
            BuildOptions(
                encoder=str(enc_dir),
                shards=str(shards_dir),
                out=str(cache_dir),
                variants=["report"],
                batch_tokens=args.batch_tokens,
                progress=False,
            ),
            encoder=enc,
        )
        best_b = min(best_b, res.seconds)
        naive, secs, n, real, padded = naive_extract(enc, shards)
        best_n = min(best_n, secs)
    cache = EmbeddingCache(cache_dir)
    diff = max(
        float(np.abs(cache.array(k)[:, 0].astype(np.float32) - v).max() / (np.abs(v).max() + 1e-12))
        for k, v in naive.items()
    )
    b_rate, n_rate = res.reports / best_b, n / best_n
    print(
        f"naive (batches of {NAIVE_BATCH} in shard order, padded to longest): {n_rate:8.1f} reports/s "
        f"({best_n:.2f} s, {real / padded:.0%} of processed tokens are real)"
    )
    print(
        f"llmclip cache build (length-sorted, {args.batch_tokens}-token batches): {b_rate:8.1f} reports/s "
        f"({best_b:.2f} s, sidecars written)"
    )
    print(
        f"ratio builder/naive: {b_rate / n_rate:.2f}x   (max relative difference of the embeddings "
        f"{diff:.1e}, fp16 storage)"
    )


if __name__ == "__main__":
    main()
