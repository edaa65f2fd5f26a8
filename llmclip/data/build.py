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
import io
import json
import multiprocessing as mp
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

import llmclip
from llmclip.config import ConfigError, writing
from llmclip.data import phantom
from llmclip.data.shards import FORMAT, SPLITS, atomic_write_text, sha256_file, shard_name
from llmclip.data.sources import Record, Source, open_source

STATE = ".build-state.json"
CHUNK = 64  # records per round trip to the worker pool: bounds memory, keeps both cores busy


@dataclass
class BuildOptions:
    """Options of one shard build; all but ``workers`` must match when a build is resumed."""

    source: str
    """Source reader name: openi, mimic-cxr, chexpert-plus, padchest, csv."""
    out: str
    """Output folder (created); holds manifest.json, images/, text/."""
    root: str | None = None
    """Dataset folder or file; None for sources shipped in packages (openi, padchest)."""
    images: str | None = None
    """'render' (phantoms from the report), a folder of images (openi, padchest), or None (source default)."""
    maxcount: int | None = None
    """Read at most this many source records (a quick subset); None reads everything."""
    shard_size: int = 256
    """Samples per shard (the last shard of each split may hold fewer)."""
    image_size: int = 256
    """Side of rendered phantoms in pixels."""
    image_format: str = "jpg"
    """Encoding of rendered phantoms: jpg (smaller) or png (lossless)."""
    max_side: int = 0
    """Re-encode source images whose longer side exceeds this (0 keeps the original bytes)."""
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """train/val/test fractions of patients for the hash split."""
    split_mode: str = "auto"
    """auto: the dataset's official split where it has one, else hash; hash: always hash."""
    workers: int = 2
    """Worker processes for labels, rendering and image checks (1 = in-process)."""

    def validate(self) -> None:
        if self.shard_size < 1:
            raise ConfigError("must be >= 1", "--shard-size")
        if self.maxcount is not None and self.maxcount < 1:
            raise ConfigError("must be >= 1", "--maxcount")
        if self.image_size < 16:
            raise ConfigError("must be >= 16", "--image-size")
        if self.image_format not in ("jpg", "png"):
            raise ConfigError("must be jpg or png", "--image-format")
        if self.max_side < 0:
            raise ConfigError("must be >= 0", "--max-side")
        if (
            len(self.splits) != 3
            or any(f < 0 for f in self.splits)
            or abs(sum(self.splits) - 1) > 1e-6
        ):
            raise ConfigError(
                f"must be three fractions summing to 1, got {self.splits}", "--splits"
            )
        if self.split_mode not in ("auto", "hash"):
            raise ConfigError("must be auto or hash", "--split-mode")
        if self.workers < 1:
            raise ConfigError("must be >= 1", "--workers")

    def identity(self) -> dict[str, Any]:
        """What makes two builds the same build (resume is allowed only between equal identities)."""
        d = dataclasses.asdict(self)
        d.pop("workers")
        d.pop("out")
        d["root"] = str(Path(self.root).resolve()) if self.root else None
        d["images"] = (
            self.images if self.images in (None, "render") else str(Path(self.images).resolve())
        )
        d["splits"] = list(self.splits)
        return d


def assign_split(patient_id: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic split of a patient from a hash of its id (same id -> same split, any machine)."""
    h = (
        int.from_bytes(hashlib.sha256(f"llmclip-split:{patient_id}".encode()).digest()[:8], "big")
        / 2**64
    )
    if h < fractions[0]:
        return "train"
    return "val" if h < fractions[0] + fractions[1] else "test"


# ---------------------------------------------------------------- per-record work (worker side)

_W: dict[str, Any] = {}


def _init_worker(opts: BuildOptions, render: bool) -> None:
    _W.update(opts=opts, render=render, labeler=None)


def _labeler():
    if _W.get("labeler") is None:
        from llmclip.clinical import Labeler  # the clinical toolkit: rule-based CheXpert labeler

        _W["labeler"] = Labeler()
    return _W["labeler"]


def _check_image(path: Path, max_side: int) -> tuple[str, bytes]:
    """(ext, bytes) of a source image after decoding it once (a corrupt file raises)."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data), formats=["JPEG", "PNG"]) as im:
        ext, size = ("jpg" if im.format == "JPEG" else "png"), im.size
        if im.format == "JPEG":  # a reduced-scale decode still reads (and checks) the whole stream
            im.draft("L", (max(64, im.width // 8), max(64, im.height // 8)))
        im.load()
    if max_side and max(size) > max_side:
        with Image.open(io.BytesIO(data), formats=["JPEG", "PNG"]) as im:
            if im.mode in ("I;16", "I;16B", "I"):  # 16-bit PNG (PadChest): scale to 8 bit
                import numpy as np

                a = np.asarray(im, dtype=np.float32)
                im = Image.fromarray((a * (255.0 / max(float(a.max()), 1.0))).astype("uint8"), "L")
            elif im.mode not in ("L", "RGB"):
                im = im.convert("L")
            im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            im.save(
                buf,
                format="JPEG" if ext == "jpg" else "PNG",
                **({"quality": 95} if ext == "jpg" else {}),
            )
            data = buf.getvalue()
    return ext, data


Result = tuple[str | None, dict[str, Any] | None, tuple[str, bytes] | None, str | None]


def process(rec: Record) -> Result:
    """(skip reason, sample json, (ext, image bytes) or None, label source) for one record.

    Any unexpected error becomes a counted skip reason, so one strange record cannot stop a build.
    """
    try:
        return _process(rec)
    except Exception as e:  # noqa: BLE001 - counted and reported in the manifest, never silent
        return f"error_{type(e).__name__}", None, None, None


def _process(rec: Record) -> Result:
    opts: BuildOptions = _W["opts"]
    if rec.error:
        return rec.error, None, None, None
    if rec.report.is_empty:
        return "empty_report", None, None, None
    labels, label_source, mentions = rec.labels, rec.label_source, None
    if labels is None:
        result = _labeler().label(rec.report.findings_impression)
        labels, label_source, mentions = dict(result.vector), "labeler", result.mentions
    image = None
    if _W["render"]:
        if mentions is None:
            mentions = _labeler().label(rec.report.findings_impression).mentions
        spec = phantom.spec_from_mentions(mentions)
        pixels = phantom.render(spec, rec.key, opts.image_size)
        image = (opts.image_format, phantom.encode(pixels, opts.image_format))
    elif rec.image_path is not None:
        if not rec.image_path.is_file():
            return "missing_image", None, None, None
        try:
            image = _check_image(rec.image_path, opts.max_side)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return "bad_image", None, None, None
    meta = {
        "key": rec.key,
        "source": rec.source,
        "patient_id": rec.patient_id,
        "study_id": rec.study_id,
        "image_id": rec.image_id,
        "view": rec.view,
        "report": rec.report.to_dict(),
        "labels": labels,
        "label_source": label_source,
        "synthetic_image": bool(_W["render"]),
        **rec.extra,
    }
    return None, meta, image, label_source


# ---------------------------------------------------------------- writing (main process)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
    with writing(tar.name):  # a full disk names the shard being written
        tar.addfile(info, io.BytesIO(data))


class SplitWriter:
    """Writes one split's shards in order; a shard becomes visible only when complete."""

    def __init__(self, out: Path, split: str, index: int, shard_size: int, with_images: bool):
        self.out, self.split, self.index, self.size = out, split, index, shard_size
        self.with_images = with_images
        self.tars: dict[str, tarfile.TarFile] = {}
        self.count, self.skipped, self.label_sources = 0, Counter(), Counter()

    def _paths(self, kind: str) -> Path:
        return (
            self.out
            / ("images" if kind == "image" else "text")
            / f"{shard_name(self.split, self.index)}.tar"
        )

    def _open(self) -> None:
        for kind in ("image", "text") if self.with_images else ("text",):
            tmp = self._paths(kind).with_suffix(".tar.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            with writing(tmp):
                self.tars[kind] = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)

    def add(
        self, key: str, meta: dict[str, Any], image: tuple[str, bytes] | None, label_source: str
    ) -> None:
        if not self.tars:
            self._open()
        meta["split"] = self.split
        text = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        if self.with_images:
            _add(self.tars["image"], f"{key}.json", text)
            _add(self.tars["image"], f"{key}.{image[0]}", image[1])
        _add(self.tars["text"], f"{key}.json", text)
        self.count += 1
        self.label_sources[label_source] += 1

    def finish(self, last_ordinal: int) -> dict[str, Any] | None:
        """Close and publish the current shard; returns its manifest entry (None if nothing open)."""
        if not self.tars:
            return None
        entry: dict[str, Any] = {
            "split": self.split,
            "index": self.index,
            "count": self.count,
            "image": None,
            "text": None,
            "sha256": {},
        }
        for kind, tar in self.tars.items():
            final = self._paths(kind)
            tmp = final.with_suffix(".tar.tmp")
            with writing(tmp):
                tar.close()
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, final)
            entry[kind] = str(final.relative_to(self.out))
            entry["sha256"][kind] = sha256_file(final)
        entry.update(
            last_ordinal=last_ordinal,
            skipped=dict(self.skipped),
            label_sources=dict(self.label_sources),
        )
        self.tars, self.index, self.count = {}, self.index + 1, 0
        self.skipped, self.label_sources = Counter(), Counter()
        return entry


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
