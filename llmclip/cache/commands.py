"""``llmclip cache build|verify``: encode every report once (any launcher), and prove a cache sound.

Build on one process, or one process per GPU under any launcher (each rank takes shards
``index % world_size``; ``--no_local_rank`` keeps DeepSpeed from adding an argument)::

    llmclip cache build --encoder runs/stage1/x/final --shards shards/mimic --out cache/mimic
    deepspeed --num_gpus 8 --no_local_rank --module llmclip.cli cache build ...
    torchrun --nproc_per_node 8 -m llmclip.cli cache build ...
    srun llmclip cache build ...

``verify`` exits 1 naming the first mismatch (keys, counts, NaN/Inf, norms, fingerprint); a missing
or malformed input is a config error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from llmclip.cache import (
    META,
    CacheMismatch,
    EmbeddingCache,
    emb_path,
    read_sidecar_keys,
)
from llmclip.config import ConfigError

ROWS_PER_BLOCK = 4096  # verify reads a memory-mapped sidecar in blocks: flat memory on any size


def encoder_fingerprint(encoder_dir: str | Path) -> str:
    """The encoder's fingerprint from its ``encoder.json`` (no weights loaded), else by loading it."""
    path = Path(encoder_dir)
    if not path.is_dir():
        raise ConfigError(f"encoder folder not found: {path}", "encoder")
    card = path / "encoder.json"
    if card.is_file():
        try:
            fp = json.loads(card.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"cannot read {card}: {e}") from None
        if isinstance(fp, str) and fp:
            return fp
    from llmclip.text.encoder import LLMEncoder

    return LLMEncoder.from_dir(path).fingerprint


def _image_shards(spec: str) -> list[Any]:
    """Image shards of SPEC, or none for a text-only source (PadChest without pixels)."""
    from llmclip.data.shards import resolve_shards

    try:
        return [s for s in resolve_shards(spec, "image") if s.path]
    except ConfigError:
        return []


def _check_rows(
    cache: EmbeddingCache, name: str, keys: list[str], args: argparse.Namespace
) -> dict:
    """NaN/Inf and norm checks of one sidecar, block by block; returns norm stats per variant."""
    arr = cache.array(name)
    norms = np.empty((arr.shape[0], arr.shape[1]), dtype=np.float32)
    for lo in range(0, arr.shape[0], ROWS_PER_BLOCK):
        block = np.asarray(arr[lo : lo + ROWS_PER_BLOCK], dtype=np.float32)
        finite = np.isfinite(block).all(axis=2)
        if not finite.all():
            i, v = np.argwhere(~finite)[0]
            raise CacheMismatch(
                f"{emb_path(cache.dir, name).name} row {lo + i} (key {keys[lo + i]!r}, "
                f"variant {cache.variants[v]!r}) holds NaN/Inf"
            )
        norms[lo : lo + len(block)] = np.linalg.norm(block, axis=2)
    stats = {}
    for v, variant in enumerate(cache.variants):
        col = norms[:, v]
        if not len(col):
            continue
        median = float(np.median(col))
        lo_ok, hi_ok = (
            max(args.min_norm, median / args.max_ratio),
            min(args.max_norm, median * args.max_ratio),
        )
        bad = np.flatnonzero((col < lo_ok) | (col > hi_ok))
        if len(bad):
            i = int(bad[0])
            raise CacheMismatch(
                f"{emb_path(cache.dir, name).name} row {i} (key {keys[i]!r}, variant "
                f"{variant!r}) has norm {col[i]:.4g}, outside [{lo_ok:.4g}, {hi_ok:.4g}] "
                f"(shard median {median:.4g}, --max-ratio {args.max_ratio:g})"
            )
        stats[variant] = (float(col.min()), median, float(col.max()))
    return stats


def verify(args: argparse.Namespace) -> dict:
    """Every check of ``llmclip cache verify``; raises ``CacheMismatch`` at the first failure."""
    from llmclip.data.shards import resolve_shards

    cache = EmbeddingCache(args.cache)
    if args.encoder:
        cache.check_matches([], fingerprint=encoder_fingerprint(args.encoder))
    shards = resolve_shards(args.shards, "text")
    cache.check_matches(shards)  # names and manifest counts first: cheap, and the usual mistake
    images = {s.name: s for s in _image_shards(args.shards)}
    rows, norm_range = 0, [math.inf, 0.0]
    for s in shards:
        keys, ident = read_sidecar_keys(cache.dir, s.name)
        if ident != cache.identity:
            raise CacheMismatch(
                f"{s.name}.keys.json was built differently from {META}: "
                + "; ".join(ident.differences(cache.identity))
            )
        cache.check_matches([s], check_keys=True)
        if s.name in images:
            cache.check_matches([images[s.name]], check_keys=True)
        for lo, _, hi in _check_rows(cache, s.name, keys, args).values():
            norm_range = [min(norm_range[0], lo), max(norm_range[1], hi)]
        rows += len(keys)
    return {
        "shards": len(shards),
        "rows": rows,
        "variants": cache.variants,
        "dim": cache.dim,
        "dtype": cache.identity.dtype,
        "fingerprint": cache.fingerprint,
        "norms": norm_range,
    }


def _cmd_verify(args: argparse.Namespace) -> int:
    try:
        summary = verify(args)
    except CacheMismatch as e:
        print(f"llmclip cache verify: MISMATCH: {e}", file=sys.stderr)
        return 1
    print(
        f"llmclip cache verify: OK {args.cache}: {summary['shards']} shards, {summary['rows']} rows, "
        f"variants {','.join(summary['variants'])}, dim {summary['dim']} {summary['dtype']}, "
        f"norms {summary['norms'][0]:.4g}..{summary['norms'][1]:.4g}, "
        f"encoder {summary['fingerprint'][:16]}"
    )
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from llmclip.cache.build import BuildOptions, build_cache
    from llmclip.distributed import dist_env

    opts = BuildOptions(
        encoder=args.encoder,
        shards=args.shards,
        out=args.out,
        variants=args.variants,
        batch_tokens=args.batch_tokens,
        dtype=args.dtype,
        instruction=args.instruction,
        precision=args.precision,
        compile=args.compile,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    opts.validate()  # before the encoder is loaded: bad options fail in a second
    res = build_cache(opts)
    env = dist_env()
    rate = res.reports / res.seconds if res.seconds > 0 else 0.0
    print(
        f"cache rank {env.rank}/{env.world_size}: encoded {len(res.encoded)} shards "
        f"({res.reports} reports, {rate:.1f} reports/s), {len(res.skipped)} already complete; "
        + (
            f"wrote {Path(args.out) / META}"
            if res.meta_written
            else "other shards are not complete yet: the rank that completes the last one "
            "writes meta.json (if none did, e.g. a rank was killed, rerun the same command)"
        ),
        file=sys.stderr,
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="build and verify the embedding cache (stage 2's text side)")
    cmds = p.add_subparsers(dest="cache_command", metavar="{build,verify}", required=True)

    b = cmds.add_parser(
        "build", help="encode every report of the shards once (distributed, resumable)"
    )
    b.add_argument("--encoder", required=True, help="stage-1 encoder folder (RUN/final)")
    b.add_argument("--shards", required=True, help="shard SPEC: DIR, DIR:train or DIR:train,val")
    b.add_argument("--out", required=True, help="cache folder")
    b.add_argument(
        "--variants",
        default="report,negated,laterality,severity",
        help="text columns, comma-separated (default: the hard negatives the stage-2 recipes "
        "use): report, negated, laterality (one finding's side "
        "changed), severity (one finding's grade changed), impression, findings; an edit column "
        "holds the report itself where it has no such finding",
    )
    b.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per encoder batch")
    b.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"], help="storage dtype")
    b.add_argument(
        "--instruction", default=None, help="instruction prefix (default: the encoder's)"
    )
    b.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="compute dtype: auto = bf16 on CUDA or a CPU with bf16 matmuls (AMX, AVX512-BF16), "
        "else fp32",
    )
    b.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoder for this build: a one-off compile per process (~30 s on a "
        "CPU, needs a C++ compiler), then ~1.3x faster bf16 forwards (benchmarks/cache.py)",
    )
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a cache built by another encoder/identity in --out",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_build)

    v = cmds.add_parser("verify", help="check a cache against its shards (and an encoder)")
    v.add_argument("cache", help="cache folder")
    v.add_argument("--shards", required=True, help="shard SPEC the cache must match")
    v.add_argument("--encoder", default=None, help="encoder folder whose fingerprint must match")
    v.add_argument("--min-norm", type=float, default=1e-6, help="smallest allowed row norm")
    v.add_argument("--max-norm", type=float, default=math.inf, help="largest allowed row norm")
    v.add_argument(
        "--max-ratio",
        type=float,
        default=100.0,
        help="a row norm may differ from its shard's median by at most this factor",
    )
    v.set_defaults(func=_cmd_verify)
