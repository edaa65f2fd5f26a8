"""Build the embedding cache: distributed over ranks, resumable, atomic, length-sorted batches.

Rank r of W encodes whole shards ``i % W == r`` under any launcher (plain, ``deepspeed``,
``torchrun``, ``srun``), reading the text-only shards (no pixels). A shard's distinct texts (all
variants) are sorted by length and encoded in token-budget batches (at most ``CPU_BATCH_TOKENS`` on a
CPU) under ``torch.inference_mode``, optionally through a ``torch.compile``'d decoder.
Each sidecar is written under a temp name and renamed when complete, so a killed run leaves nothing
that is read; the rerun skips complete sidecars and redoes the rest. No collective is needed: whichever
rank finds every shard complete writes ``meta.json`` (the same bytes from any rank, atomic rename),
so a fast rank never waits in a barrier (and its timeout) for a slow one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmclip.cache import (
    DTYPES,
    META,
    CacheIdentity,
    emb_path,
    keys_path,
    read_meta,
    sidecar_names,
    sidecar_state,
    write_meta,
    write_sidecar,
)
from llmclip.cache.texts import VARIANTS, parse_variants, read_reports
from llmclip.config import ConfigError
from llmclip.precision import inference_precision

# Texts per encode() call: enough for the encoder to form several full token-budget batches from a
# length-sorted run, small enough that the progress bar moves.
CHUNK_TOKENS_FACTOR = 8
# Largest batch on a CPU: past ~2048 tokens a layer's activations leave the cache (SmolLM2 on
# Open-I, one core: 2048-token batches 1.5x faster than 8192, in bf16 and in fp32).
CPU_BATCH_TOKENS = 2048


# ----------------------------------------------------------------------------------------------
# Builder.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BuildOptions:
    """One ``llmclip cache build`` job (every rank gets the same options)."""

    encoder: str
    """Stage-1 encoder folder (``RUN/final``)."""
    shards: str
    """Shard SPEC (``DIR``, ``DIR:train``, ``DIR:train,val``); its text-only shards are read."""
    out: str
    """Cache folder."""
    variants: list[str] = dataclasses.field(
        default_factory=lambda: ["report", "negated", "laterality", "severity"]
    )
    """Text columns per sample: report, negated, laterality (one finding's side changed),
    severity (one finding's grade changed), impression, findings."""
    batch_tokens: int = 8192
    """Token budget of one encoder batch (padded tokens); at most ``CPU_BATCH_TOKENS`` on a CPU."""
    dtype: str = "fp16"
    """Storage dtype of the sidecars: fp16 or fp32."""
    instruction: str | None = None
    """Instruction prepended to every text; None = the encoder's own."""
    precision: str = "auto"
    """Encoder weights dtype: auto (bf16 on CUDA or a CPU with bf16 matmuls, else fp32), bf16 or fp32."""
    compile: bool = False
    """``torch.compile`` the decoder (dynamic shapes) for this build: one compile per process (~30 s
    for SmolLM2 on one CPU core), then ~1.3x faster CPU forwards in bf16."""
    overwrite: bool = False
    """Replace a cache of another identity in ``out`` instead of refusing."""
    progress: bool = True
    """Per-rank tqdm bar with reports/s and ETA."""

    def validate(self) -> None:
        self.variants = parse_variants(self.variants)
        if self.batch_tokens < 1:
            raise ConfigError("must be >= 1", "batch_tokens")
        if self.dtype not in DTYPES:
            raise ConfigError(f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}", "dtype")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"must be auto, bf16 or fp32, got {self.precision!r}", "precision")
        if not Path(self.encoder).is_dir():
            raise ConfigError(f"encoder folder not found: {self.encoder}", "encoder")


@dataclasses.dataclass
class BuildResult:
    """What one rank did."""

    encoded: list[str]
    """Shards encoded in this run."""
    skipped: list[str]
    """Shards found complete (resume)."""
    reports: int
    """Samples encoded in this run."""
    seconds: float
    """Wall time of the encoding (model load excluded)."""
    meta_written: bool
    """Whether this rank found every shard complete and wrote meta.json."""


def _check_folder(
    out: Path, ident: CacheIdentity, mine: set[str], spec: set[str], overwrite: bool, is_main: bool
) -> None:
    """Refuse a folder holding a cache of another identity; ``overwrite`` deletes it instead.

    Each rank deletes only its own shards' sidecars (no race with another rank's fresh files);
    rank 0 also deletes the meta and sidecars of shards outside this job.
    """
    foreign: list[tuple[str | None, str]] = []  # (shard name or None for meta, why)
    if (out / META).exists():
        try:
            theirs, _ = read_meta(out)
            if theirs != ident:
                foreign.append((None, "; ".join(ident.differences(theirs))))
        except ConfigError as e:
            foreign.append((None, str(e)))
    for name in sidecar_names(out):
        state, detail = sidecar_state(out, name, ident)
        if state == "foreign":
            foreign.append((name, "; ".join(ident.differences(detail))))
    if foreign and not overwrite:
        name, why = foreign[0]
        raise ConfigError(
            f"{out} holds an embedding cache built differently "
            f"({keys_path(out, name).name if name else META}: {why}); "
            "pass --overwrite to replace it, or choose another --out",
            "out",
        )
    for name, _ in foreign:
        if name is None and is_main:
            (out / META).unlink(missing_ok=True)
        elif name is not None and (name in mine or (is_main and name not in spec)):
            emb_path(out, name).unlink(missing_ok=True)
            keys_path(out, name).unlink(missing_ok=True)


def _chunks(order: list[int], texts: list[str], budget_tokens: int) -> Iterator[list[int]]:
    """Consecutive runs of a length-sorted order, ~``budget_tokens`` estimated tokens each."""
    chunk: list[int] = []
    used = 0
    for j in order:
        chunk.append(j)
        used += len(texts[j]) // 4 + 1  # ~4 characters per token: only sizes the progress steps
        if used >= budget_tokens:
            yield chunk
            chunk, used = [], 0
    if chunk:
        yield chunk


def encode_shard(
    encoder: Any,
    path: str | Path,
    variants: list[str],
    instruction: str | None,
    batch_tokens: int,
    dtype: str,
    pbar: Any = None,
) -> tuple[list[str], np.ndarray]:
    """(keys, ``[n, variants, dim]`` array) for one shard: every distinct text once, length-sorted.

    Texts repeat (an edit column holds the report when it has no such edit, short normal reports
    recur), so each distinct text is encoded once, in first-seen order before the sort, and its row
    copied to every cell that holds it. The sort is global within the shard (all variants
    together), longest first so that an out-of-memory batch shows up at once; each ``encode`` call
    gets a run of similar lengths and packs it into token-budget batches.
    """
    import torch

    keys: list[str] = []
    texts: list[str] = []
    for key, report in read_reports(path):
        keys.append(key)
        texts.extend(VARIANTS[v](report) for v in variants)
    slot: dict[str, int] = {}  # distinct text -> its row of ``out``, numbered in first-seen order
    cells = np.array([slot.setdefault(t, len(slot)) for t in texts], dtype=np.int64)
    unique = list(slot)
    out = np.empty((len(unique), encoder.dim), dtype=DTYPES[dtype])
    order = sorted(range(len(unique)), key=lambda u: len(unique[u]), reverse=True)
    for chunk in _chunks(order, unique, CHUNK_TOKENS_FACTOR * batch_tokens):
        with torch.inference_mode():
            emb = encoder.encode(
                [unique[u] for u in chunk], instruction=instruction, batch_tokens=batch_tokens
            )
        rows = emb.detach().float().cpu().numpy().astype(out.dtype)
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            j = int(np.argmax(cells == chunk[int(np.argmax(bad))]))  # its first cell
            raise ConfigError(
                f"{path}: sample {keys[j // len(variants)]!r} variant "
                f"{variants[j % len(variants)]!r} encodes to NaN/Inf in {dtype} "
                "(encoder diverged, or values overflow fp16: try --dtype fp32)"
            )
        out[chunk] = rows
        if pbar is not None:  # in reports: the shard's reports spread over its distinct texts
            pbar.update(len(chunk) * len(keys) / len(unique))
    return keys, out[cells].reshape(len(keys), len(variants), encoder.dim)


def _progress(total: float, rank: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"cache rank {rank}",
        unit="report",
        position=rank,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=1.0,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} "
        "[{elapsed}<{remaining}, {rate_fmt}]",
    )


def _share_cpu_threads(torch: Any) -> None:
    """Split the node's cores between the ranks on it (CPU only, unless OMP_NUM_THREADS is set).

    Every rank otherwise starts one thread per core, and N ranks on a node oversubscribe it N-fold.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return
    local = 1
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(var, "").isdigit():
            local = max(1, int(os.environ[var]))
            break
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))


def _same_source(out: Path, shard: Any) -> bool:
    """Whether a complete sidecar was read from this very shard file (checksum in the manifest)."""
    want = getattr(shard, "sha256", None)
    have = json.loads(keys_path(out, shard.name).read_text(encoding="utf-8")).get("source_sha256")
    return want is None or have is None or want == have


def build_cache(opts: BuildOptions, encoder: Any = None) -> BuildResult:
    """Encode this rank's shards (index mod world size) into ``opts.out``; resumable, atomic.

    ``encoder``: an already loaded ``LLMEncoder`` (benchmarks, tests); loaded from ``opts.encoder``
    on this rank's device otherwise.
    """
    import torch
    from tqdm import tqdm

    from llmclip.data.shards import resolve_shards
    from llmclip.distributed import dist_env

    opts.validate()
    env = dist_env()
    shards = resolve_shards(opts.shards, "text")
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"shard names repeat in {opts.shards}: one cache folder holds one "
            "dataset; build each source into its own --out",
            "shards",
        )
    mine = [s for i, s in enumerate(shards) if i % env.world_size == env.rank]
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    cuda = torch.cuda.is_available()
    if encoder is None:  # a caller that passes its encoder also chose its threads
        from llmclip.text.encoder import LLMEncoder

        if not cuda:
            _share_cpu_threads(torch)
        device = f"cuda:{env.local_rank}" if cuda else "cpu"
        bf16 = inference_precision(opts.precision, cuda) == "bf16"
        encoder = LLMEncoder.from_dir(
            opts.encoder, device=device, dtype=torch.bfloat16 if bf16 else torch.float32
        )
    instruction = (
        opts.instruction if opts.instruction is not None else getattr(encoder, "instruction", None)
    )
    ident = CacheIdentity(
        encoder.fingerprint,
        str(encoder.pooling),
        int(encoder.max_length),
        instruction,
        tuple(opts.variants),
        int(encoder.dim),
        opts.dtype,
    )
    _check_folder(out, ident, {s.name for s in mine}, set(names), opts.overwrite, env.is_main)
    first = next(iter(getattr(encoder, "parameters", list)()), None)  # CPU: smaller batches
    cpu = first is not None and first.device.type == "cpu"
    batch_tokens = min(opts.batch_tokens, CPU_BATCH_TOKENS) if cpu else opts.batch_tokens

    todo = []
    skipped = []
    for s in mine:
        state, detail = sidecar_state(out, s.name, ident)
        if state == "complete" and detail == s.count and _same_source(out, s):
            skipped.append(s.name)
        else:
            todo.append(s)
    pbar = _progress(sum(s.count for s in todo), env.rank, opts.progress and bool(todo))
    start, reports = time.perf_counter(), 0
    lm = encoder.lm if opts.compile and todo else None
    if lm is not None:  # a caller's encoder is handed back uncompiled (finally below)
        encoder.lm = torch.compile(lm, dynamic=True)
    try:
        for s in todo:
            for stale in out.glob(f"{s.name}.*.tmp"):  # left by a killed run
                stale.unlink(missing_ok=True)
            keys, emb = encode_shard(
                encoder, s.path, opts.variants, instruction, batch_tokens, opts.dtype, pbar
            )
            if len(keys) != s.count:
                raise ConfigError(
                    f"{s.path} holds {len(keys)} samples, its manifest says {s.count}: "
                    "run `llmclip shards verify`"
                )
            write_sidecar(out, s.name, keys, emb, ident, getattr(s, "sha256", None))
            reports += len(keys)
            tqdm.write(f"cache rank {env.rank}: wrote {s.name} ({len(keys)} reports)",
                       file=sys.stderr)
    finally:
        if lm is not None:
            encoder.lm = lm
    pbar.close()
    seconds = time.perf_counter() - start
    return BuildResult(
        [s.name for s in todo], skipped, reports, seconds, finish_meta(out, ident, shards)
    )


def finish_meta(out: Path, ident: CacheIdentity, shards: Sequence[Any]) -> bool:
    """Write ``meta.json`` if every shard of the job is complete (any rank may; the bytes are equal).

    The meta lists every complete sidecar of this identity in the folder, so building ``DIR:train``
    and then ``DIR:val`` into one folder yields one cache of both.
    """
    for s in shards:
        state, count = sidecar_state(out, s.name, ident)
        if state != "complete" or count != s.count:
            return False
    counts = {}
    for name in sidecar_names(out):
        state, count = sidecar_state(out, name, ident)
        if state == "complete":
            counts[name] = count
    write_meta(out, ident, counts)
    return True
