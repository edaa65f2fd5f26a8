"""The sample index of the training data order (``llmclip.data.order``, rule 1): every usable
sample of a shard set, with the byte range of each of its members, from tar headers and each
sample's json; nothing else of a shard is read or decoded here.

Only ``json`` members are decoded (strict UTF-8 JSON objects); image members are located, never
opened. Links, devices, path-like keys, oversized, duplicate and truncated members are left out and
counted under the loader's reason names, so a hostile shard cannot execute, escape or exhaust memory
through this reader either (tests/faults/test_hostile_shards.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from llmclip.data.safetar import UnreadableTar, read_members, split_key
from llmclip.data.shards import IMAGE_EXTS, ShardInfo, decode_meta, resolve_shards

log = logging.getLogger("llmclip.data")


def has_report(meta: dict[str, Any]) -> bool:
    """The loader's rule for a trainable sample: its report has findings, impression or full text."""
    report = meta.get("report") if isinstance(meta.get("report"), dict) else {}
    return bool(report.get("findings") or report.get("impression") or report.get("full"))


@dataclass
class SampleIndex:
    """Byte ranges of every usable sample of a shard set (see the module docstring, rule 1)."""

    shards: list[ShardInfo]
    kind: str
    shard: np.ndarray  # int32 [N]: index into ``shards``
    keys: list[str]
    json: np.ndarray  # int64 [N, 2]: offset, size of the json member
    image: np.ndarray  # int64 [N, 3]: offset, size, IMAGE_EXTS index (-1 rows for text shards)
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.keys)

    @cached_property
    def fingerprint(self) -> str:
        """Identity of the sample list (shard names and keys, in order): a position is only
        meaningful for the index it was counted in."""
        h = hashlib.sha256()
        for i, key in enumerate(self.keys):
            h.update(f"{self.shards[self.shard[i]].name}/{key}\n".encode())
        return h.hexdigest()[:16]


def _members(path: Path, skipped: Counter) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {ext: (offset, size)}) per sample of one tar, from its headers (payloads are skipped
    by seeking); consecutive members with one key form a sample, as in the loader."""
    size = path.stat().st_size
    key, exts, keep = None, {}, False  # the current member group, and whether it is a new sample
    seen: set[str] = set()
    try:
        for member in read_members(path, read=lambda name: False):
            if member.name.startswith("__") and member.name.endswith("__"):
                continue
            parts = split_key(member.name)
            if parts is None:
                continue
            k, ext = parts
            if member.oversized:
                skipped["oversized_member"] += 1
                continue
            if member.offset + member.size > size:
                skipped["lost_in_broken_tar"] += 1
                continue
            if k != key:
                if keep:
                    yield key, exts
                key, exts, keep = k, {}, k not in seen
                if not keep:  # a key seen earlier in this shard: the whole repeat is dropped
                    skipped["duplicate_key"] += 1
                seen.add(k)
            if not keep:
                continue
            if ext in exts:
                skipped["duplicate_member"] += 1
                continue
            exts[ext] = (member.offset, member.size)
    except UnreadableTar as e:
        skipped["tar_error"] += 1
        log.warning("unreadable past some point (%s); its readable samples are used", e)
    if keep:
        yield key, exts


def read_range(f: Any, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of an open shard file (a member's payload); ``OSError`` if short."""
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise OSError(f"short read: {len(data)} of {size} bytes")
    return data


def check_meta(data: bytes, key: str, usable: Callable[[dict[str, Any]], bool]) -> dict | str:
    """The sample json, or the reason it is skipped (the loader's reason names)."""
    try:
        meta = decode_meta(data)
    except UnicodeDecodeError:
        return "bad_utf8"
    except ValueError:
        return "bad_json"
    if meta.get("key") != key:
        return "bad_json"
    return meta if usable(meta) else "empty_report"


def build_index(spec: str, kind: str, usable: Callable[[dict[str, Any]], bool] = has_report,
                shards: list[ShardInfo] | None = None) -> SampleIndex:
    """The index of the shards named by ``spec`` (``kind`` ``image`` or ``text``)."""
    shards = resolve_shards(spec, kind) if shards is None else shards
    skipped: Counter = Counter()
    sid: list[int] = []
    keys: list[str] = []
    js: list[tuple[int, int]] = []
    im: list[tuple[int, int, int]] = []
    for s_i, shard in enumerate(shards):
        with open(shard.path, "rb") as f:
            for key, exts in _members(Path(shard.path), skipped):
                if not key or "/" in key or "\\" in key:
                    skipped["bad_key"] += 1
                    continue
                if "json" not in exts:
                    skipped["missing_json"] += 1
                    continue
                meta = check_meta(read_range(f, *exts["json"]), key, usable)
                if isinstance(meta, str):
                    skipped[meta] += 1
                    continue
                img = (-1, -1, -1)
                if kind == "image":
                    ext = next((e for e in IMAGE_EXTS if e in exts), None)
                    if ext is None:
                        skipped["missing_image"] += 1
                        continue
                    img = (*exts[ext], IMAGE_EXTS.index(ext))
                sid.append(s_i)
                keys.append(key)
                js.append(exts["json"])
                im.append(img)
    if skipped:
        log.warning("%s: %d usable samples; left out %s", spec, len(keys), dict(skipped))
    return SampleIndex(shards, kind, np.asarray(sid, dtype=np.int32), keys,
                       np.asarray(js, dtype=np.int64).reshape(-1, 2),
                       np.asarray(im, dtype=np.int64).reshape(-1, 3), skipped)
