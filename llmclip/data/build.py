"""``llmclip shards build``: a source's records -> image + text shards, patient split, manifest, resume.

Flow: the source yields records in a fixed order (record ordinal = position in that order). Each
record gets its split from its patient (``assign_split``), so no patient is in two splits. Records
go to worker processes in bounded chunks (labels from the Labeler when the dataset has none,
phantom pixels when rendering, source images checked by decoding them) and come back in order;
the main process writes them into per-split shards of ``shard_size`` samples.

Atomic and resumable: a shard is written to ``*.tar.tmp`` and renamed when full; then
``.build-state.json`` (atomically replaced) records it with the ordinal of its last record and the
records it skipped. A rerun with the same options re-reads the source, skips every record at or
before that ordinal for its split without any work, and rewrites everything after it: complete
shards are kept, partial ones are redone, the result is byte-identical (tar members carry fixed
mtime/owner). ``manifest.json`` is written last; its presence means the build is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

import llmclip
from llmclip.config import ConfigError
from llmclip.data.build_options import BuildOptions
from llmclip.data.build_worker import _init_worker, process
from llmclip.data.shard_writer import SplitWriter
from llmclip.data.shards import FORMAT, SPLITS, atomic_write_text
from llmclip.data.sources import Record, Source, open_source

STATE = ".build-state.json"
CHUNK = 64  # records per round trip to the worker pool: bounds memory, keeps both cores busy


def assign_split(patient_id: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic split of a patient from a hash of its id (same id -> same split, any machine)."""
    h = (
        int.from_bytes(hashlib.sha256(f"llmclip-split:{patient_id}".encode()).digest()[:8], "big")
        / 2**64
    )
    if h < fractions[0]:
        return "train"
    return "val" if h < fractions[0] + fractions[1] else "test"


def _check_out(out: Path, opts: BuildOptions) -> dict[str, Any] | None:
    """Existing state to resume from, None for a fresh build; refuses folders of other builds."""
    ident = opts.identity()
    for fname in ("manifest.json", STATE):
        p = out / fname
        if not p.is_file():
            continue
        try:
            prev = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"{p} is unreadable; remove {out} to rebuild", "--out") from None
        if prev.get("source") != opts.source:
            raise ConfigError(
                f"{out} holds shards of another source ({prev.get('source')!r}, not "
                f"{opts.source!r}); choose another --out",
                "--out",
            )
        if prev.get("build") != ident:
            diff = sorted(k for k in ident if (prev.get("build") or {}).get(k) != ident[k])
            raise ConfigError(
                f"{out} was built with other options ({', '.join(diff)}); use another --out "
                "or the same options to resume",
                "--out",
            )
        return prev | {"complete": fname == "manifest.json"}
    if out.exists() and any(p.name not in ("images", "text") for p in out.iterdir()):
        raise ConfigError(
            f"{out} is not empty and holds no llmclip shards; choose another --out", "--out"
        )
    return None


def build(opts: BuildOptions, progress: bool = True) -> dict[str, Any]:
    """Build (or resume) the shards; returns the manifest."""
    opts.validate()
    out = Path(opts.out)
    src: Source = open_source(opts.source, opts.root, opts.images)
    if opts.images is None and getattr(src, "default_images", None) == "render":
        opts = dataclasses.replace(opts, images="render")  # Open-I from the package: no pixels
    prev = _check_out(out, opts)
    if prev and prev["complete"]:
        prev.pop("complete")
        return prev
    out.mkdir(parents=True, exist_ok=True)
    for tmp in list(out.glob("*/*.tar.tmp")):
        tmp.unlink()  # partial shards of a killed run: redone below
    render = opts.images == "render"
    with_images = render or src.has_images
    done: list[dict[str, Any]] = list(prev["shards"]) if prev else []
    upto = {s: -1 for s in SPLITS}
    next_index = dict.fromkeys(SPLITS, 0)
    for e in done:
        upto[e["split"]] = max(upto[e["split"]], e["last_ordinal"])
        next_index[e["split"]] = max(next_index[e["split"]], e["index"] + 1)
    writers = {s: SplitWriter(out, s, next_index[s], opts.shard_size, with_images) for s in SPLITS}
    state = {"format": FORMAT, "source": opts.source, "build": opts.identity(), "shards": done}

    def save_state() -> None:
        atomic_write_text(out / STATE, json.dumps(state))  # compact: C encoder, rewritten per shard

    seen: set[str] = set()
    patient_split: dict[str, str] = {}
    read = 0
    _init_worker(opts, render)
    # fork before any thread exists (tqdm starts a monitor thread)
    pool = (
        mp.get_context("fork").Pool(opts.workers, _init_worker, (opts, render))
        if opts.workers > 1
        else None
    )
    bar = tqdm(
        total=opts.maxcount or src.total,
        unit="rec",
        desc=f"shards {opts.source}",
        disable=not progress,
        mininterval=1.0,
    )

    def flush(batch: list[tuple[int, str, Record]]) -> None:
        recs = [r for _, _, r in batch]
        results = pool.map(process, recs, chunksize=8) if pool else [process(r) for r in recs]
        for (ordinal, split, rec), (reason, meta, image, label_source) in zip(
            batch, results, strict=True
        ):
            w = writers[split]
            if reason:
                w.skipped[reason] += 1
            else:
                w.add(rec.key, meta, image, label_source)
            if w.count >= opts.shard_size:
                state["shards"].append(w.finish(ordinal))
                save_state()

    try:
        batch: list[tuple[int, str, Record]] = []
        for ordinal, rec in enumerate(src):
            if opts.maxcount is not None and ordinal >= opts.maxcount:
                break
            read += 1
            if bar.total is None and src.total:
                bar.total = min(src.total, opts.maxcount or src.total)
            bar.update(1)
            split = patient_split.get(rec.patient_id)
            if split is None:
                official = rec.split if opts.split_mode == "auto" else None
                split = (
                    official if official in SPLITS else assign_split(rec.patient_id, opts.splits)
                )
                patient_split[rec.patient_id] = split  # first record of a patient decides for all
            duplicate = rec.key in seen
            seen.add(rec.key)
            if ordinal <= upto[split]:
                continue  # inside a complete shard of an earlier run
            if duplicate:
                rec = dataclasses.replace(rec, error="duplicate_key")
            batch.append((ordinal, split, rec))
            if len(batch) >= CHUNK * opts.workers:
                flush(batch)
                batch = []
        flush(batch)
        for w in writers.values():
            entry = w.finish(read - 1)
            if entry:
                state["shards"].append(entry)
            elif w.skipped:  # skips after a split's last shard still have to be counted
                state["shards"].append({"split": w.split, "tail": True, "skipped": dict(w.skipped)})
    finally:
        bar.close()
        if pool:
            pool.terminate()
    return _finish(out, opts, state, read, render)


def _finish(
    out: Path, opts: BuildOptions, state: dict[str, Any], read: int, render: bool
) -> dict[str, Any]:
    skipped, label_sources, splits = Counter(), Counter(), Counter()
    shards = []
    for e in state["shards"]:
        skipped.update(e.get("skipped", {}))
        if e.get("tail"):
            continue
        label_sources.update(e.get("label_sources", {}))
        splits[e["split"]] += e["count"]
        shards.append({k: e[k] for k in ("split", "index", "count", "image", "text", "sha256")})
    shards.sort(key=lambda s: (SPLITS.index(s["split"]), s["index"]))
    manifest = {
        "format": FORMAT,
        "source": opts.source,
        "created_by": f"llmclip {llmclip.__version__} shards build",
        "shards": shards,
        "splits": {s: splits[s] for s in SPLITS},
        "label_source": "+".join(sorted(label_sources)) or None,
        "label_sources": dict(sorted(label_sources.items())),
        "synthetic_images": render,
        "records_read": read,
        "skipped": dict(sorted(skipped.items())),
        "samples": sum(splits.values()),
        "build": opts.identity(),
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    (out / STATE).unlink(missing_ok=True)
    return manifest
