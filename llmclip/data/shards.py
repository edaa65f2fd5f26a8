"""The shard format (``llmclip-shards/1``): manifest, shard lists, safe sequential reading, verify, stats.

A shard folder ``DIR`` holds ``manifest.json``, ``images/{split}-{NNNNNN}.tar`` (image + json) and
``text/{split}-{NNNNNN}.tar`` (json only) with the same keys in the same order. ``shards/README.md``
documents every field. Everything here treats the folder as untrusted input: paths in the manifest
must be plain names inside ``DIR`` (no ``..``, no ``pipe:`` URLs), and members are returned as bytes
(only ``json`` is ever decoded here, as UTF-8 JSON; nothing is unpickled or executed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmclip.config import ConfigError, writing
from llmclip.data.safetar import UnreadableTar, read_members, split_key
from llmclip.data.text import sample_text

FORMAT = "llmclip-shards/1"
SPLITS = ("train", "val", "test")
IMAGE_EXTS = ("png", "jpg")
_SHARD_PATH = re.compile(r"^(images|text)/(train|val|test)-(\d{6})\.tar$")


@dataclass(frozen=True)
class ShardInfo:
    """One shard file of a given kind, as listed in the manifest."""

    path: Path
    split: str
    index: int
    count: int
    kind: str
    sha256: str | None = None

    @property
    def name(self) -> str:
        """``train-000000``: the same for the image and the text shard (and cache sidecars)."""
        return shard_name(self.split, self.index)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with writing(path), os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a manifest is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_manifest(root: str | Path) -> dict[str, Any]:
    """Read and check ``DIR/manifest.json``; every problem is a ConfigError naming the file."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ConfigError(
            f"no manifest.json in {root} (not a shard folder, or its build is unfinished)"
        )
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ConfigError(
            f"{path}: format must be {FORMAT!r}, got {m.get('format') if isinstance(m, dict) else m!r}"
        )
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise ConfigError(f"{path}: 'shards' must be a list")
    for i, s in enumerate(shards):
        where = f"{path}: shards[{i}]"
        if not isinstance(s, dict) or s.get("split") not in SPLITS:
            raise ConfigError(f"{where}: split must be one of {SPLITS}")
        if (
            not isinstance(s.get("index"), int)
            or not isinstance(s.get("count"), int)
            or s["count"] < 0
        ):
            raise ConfigError(f"{where}: index and count must be non-negative integers")
        for kind in ("image", "text"):
            rel = s.get(kind)
            if rel is None and kind == "image":
                continue
            mt = _SHARD_PATH.match(rel) if isinstance(rel, str) else None
            want = ("images" if kind == "image" else "text", s["split"], f"{s['index']:06d}")
            if not mt or mt.groups() != want:
                raise ConfigError(
                    f"{where}: {kind} path {rel!r} must be {want[0]}/{shard_name(s['split'], s['index'])}.tar"
                )
    return m


def parse_spec(spec: str) -> tuple[Path, list[str] | None]:
    """``DIR``, ``DIR:train`` or ``DIR:train,val`` -> (DIR, splits or None for all)."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and tail and all(t in SPLITS for t in tail.split(",")):
        return Path(head), tail.split(",")
    if sep and tail and "/" not in tail and not Path(spec).exists():
        raise ConfigError(
            f"unknown split(s) {tail!r} in shard spec {spec!r}; valid: {', '.join(SPLITS)}"
        )
    return Path(spec), None


def resolve_shards(spec: str, kind: Literal["image", "text"]) -> list[ShardInfo]:
    """Shards of ``kind`` named by ``spec``, in manifest order (split order, then index)."""
    if kind not in ("image", "text"):
        raise ConfigError(f"shard kind must be 'image' or 'text', got {kind!r}")
    root, splits = parse_spec(spec)
    m = load_manifest(root)
    out = []
    for s in m["shards"]:
        if splits is not None and s["split"] not in splits:
            continue
        rel = s.get(kind)
        if rel is None:
            raise ConfigError(
                f"{root}: source {m.get('source')!r} has no image shards (text-only); "
                "use the text shards"
            )
        out.append(
            ShardInfo(
                root / rel,
                s["split"],
                s["index"],
                s["count"],
                kind,
                (s.get("sha256") or {}).get(kind),
            )
        )
    out.sort(key=lambda x: (SPLITS.index(x.split), x.index))
    if not out:
        raise ConfigError(
            f"no {kind} shards for {spec!r} (splits in manifest: {sorted(m.get('splits', {}))})"
        )
    return out


def read_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, sequentially (``llmclip.data.safetar``); raises
    ``UnreadableTar`` on a broken file or on a member over ``safetar.MAX_MEMBER_BYTES``."""
    current: tuple[str, dict[str, bytes]] | None = None
    for member in read_members(path, read=lambda name: split_key(name) is not None):
        parts = split_key(member.name)
        if parts is None:
            continue
        if member.oversized:
            raise UnreadableTar(f"{path}: member {member.name!r} claims {member.size} bytes")
        if current is None or current[0] != parts[0]:
            if current is not None:
                yield current
            current = (parts[0], {})
        current[1][parts[1]] = member.data
    if current is not None:
        yield current


def decode_meta(data: bytes) -> dict[str, Any]:
    """Sample json: strict UTF-8, a JSON object; raises ValueError otherwise."""
    meta = json.loads(data.decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("sample json is not an object")
    return meta


@dataclass
class VerifyResult:
    ok: bool
    problems: list[str]
    samples: int


def verify(root: str | Path) -> VerifyResult:
    """Check every shard: sha256, sample count, image/text key alignment, unique keys, valid json."""
    root = Path(root)
    m = load_manifest(root)
    problems: list[str] = []
    seen: set[str] = set()
    total = 0
    for s in m["shards"]:
        name = shard_name(s["split"], s["index"])
        keys_by_kind = {}
        for kind in ("image", "text"):
            rel = s.get(kind)
            if rel is None:
                continue
            p = root / rel
            if not p.is_file():
                problems.append(f"{rel}: missing")
                continue
            want = (s.get("sha256") or {}).get(kind)
            if want != sha256_file(p):
                problems.append(f"{rel}: sha256 mismatch")
            keys = []
            try:
                for key, members in read_tar(p):
                    keys.append(key)
                    if "json" not in members:
                        problems.append(f"{rel}: {key} has no json")
                    else:
                        try:
                            meta = decode_meta(members["json"])
                            if meta.get("key") != key or meta.get("split") != s["split"]:
                                problems.append(
                                    f"{rel}: {key} json key/split disagree with the shard"
                                )
                        except ValueError as e:
                            problems.append(f"{rel}: {key} bad json ({e})")
                    if kind == "image" and not any(e in members for e in IMAGE_EXTS):
                        problems.append(f"{rel}: {key} has no image")
                    if kind == "text" and any(e in members for e in IMAGE_EXTS):
                        problems.append(f"{rel}: {key} carries pixels in a text shard")
            except UnreadableTar as e:
                problems.append(f"{rel}: unreadable tar ({e})")
            if len(keys) != s["count"]:
                problems.append(f"{rel}: {len(keys)} samples, manifest says {s['count']}")
            keys_by_kind[kind] = keys
        if len(keys_by_kind) == 2 and keys_by_kind["image"] != keys_by_kind["text"]:
            problems.append(f"{name}: image and text shards differ in keys or order")
        keys = next(iter(keys_by_kind.values()), [])
        dup = [k for k, n in Counter(keys).items() if n > 1] + [k for k in set(keys) if k in seen]
        if dup:
            problems.append(f"{name}: duplicate keys {sorted(dup)[:5]}")
        seen.update(keys)
        total += len(keys)
    splits = Counter()
    for s in m["shards"]:
        splits[s["split"]] += s["count"]
    if dict(splits) != {k: v for k, v in (m.get("splits") or {}).items() if v}:
        problems.append(f"manifest splits {m.get('splits')} != sum of shard counts {dict(splits)}")
    return VerifyResult(not problems, problems, total)


def stats(root: str | Path) -> dict[str, Any]:
    """Counts per split, patients per split, label prevalence (positive / uncertain), report length."""
    root = Path(root)
    m = load_manifest(root)
    out: dict[str, Any] = {
        "source": m.get("source"),
        "label_source": m.get("label_source"),
        "synthetic_images": m.get("synthetic_images"),
        "splits": {},
    }
    for split in SPLITS:
        shards = [s for s in m["shards"] if s["split"] == split]
        if not shards:
            continue
        pos, unc, patients, words, n = Counter(), Counter(), set(), [], 0
        for s in shards:
            for _key, members in read_tar(root / s["text"]):
                meta = decode_meta(members["json"])
                n += 1
                patients.add(meta.get("patient_id"))
                for cls, v in (meta.get("labels") or {}).items():
                    pos[cls] += v == 1
                    unc[cls] += v == -1
                words.append(len(sample_text(meta).split()))
        words.sort()
        out["splits"][split] = {
            "samples": n,
            "shards": len(shards),
            "patients": len(patients),
            "report_words": {
                "mean": round(sum(words) / max(n, 1), 1),
                "median": words[n // 2] if n else 0,
                "p95": words[min(n - 1, int(0.95 * n))] if n else 0,
            },
            "positive": {c: round(v / max(n, 1), 4) for c, v in sorted(pos.items())},
            "uncertain": {c: round(v / max(n, 1), 4) for c, v in sorted(unc.items()) if v},
        }
    out["skipped"] = m.get("skipped", {})
    return out
