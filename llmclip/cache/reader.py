"""The embedding cache on disk and its reader: every report encoded once, aligned to the shards.

Stage 2 never runs the LLM; it reads rows that ``llmclip.cache.build`` wrote. Layout of ``CACHE/``:

- ``{split}-{NNNNNN}.emb.npy``: fp16 ``[n, variants, dim]``, row i = sample i of that shard;
- ``{split}-{NNNNNN}.keys.json``: ``{"shard", "keys", "build"}``; ``build`` is the identity of the
  cache (encoder fingerprint, pooling, max length, instruction, variants, dim, dtype), so a sidecar
  describes itself even before ``meta.json`` exists (resume refuses a foreign one);
- ``meta.json``: ``{"format": "llmclip-cache/1", <identity>, "shards": {name: count}}``, written once
  every shard is complete; its absence means "not finished", and the reader refuses such a folder.

An ``.emb.npy`` is renamed into place after its keys file, so its presence means the sidecar is
complete. ``EmbeddingCache`` memory-maps sidecars (``np.load(mmap_mode="r", allow_pickle=False)``)
and checks every requested key against the sidecar's keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmclip.config import ConfigError, writing
from llmclip.data.safetar import UnreadableTar, read_members, split_key
from llmclip.data.text import TEXT_SPEC

FORMAT = "llmclip-cache/1"
META = "meta.json"
DTYPES = {"fp16": np.float16, "fp32": np.float32}


class CacheMismatch(ConfigError):
    """The cache does not match the shards, the encoder or its own meta (names the first mismatch)."""


# ----------------------------------------------------------------------------------------------
# Shard names and keys (tar member names only: nothing is decoded or unpickled).
# ----------------------------------------------------------------------------------------------


def shard_name(shard: Any) -> str:
    """``train-000000`` from a ShardInfo, a name, a path or a URL of an image or text shard."""
    name = getattr(shard, "name", None)
    if isinstance(name, str) and not isinstance(shard, Path):
        return name
    base = str(shard).rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar", ".emb.npy", ".keys.json"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def shard_keys(path: str | Path) -> list[str]:
    """Sample keys of a shard in order, from member headers only (payloads are skipped)."""
    keys: list[str] = []
    seen: set[str] = set()
    try:
        for m in read_members(path, read=lambda name: False):
            key = (split_key(m.name) or (m.name, ""))[0]
            if key not in seen:
                seen.add(key)
                keys.append(key)
    except UnreadableTar as e:
        raise ConfigError(f"cannot read shard {e}") from None
    return keys


# ----------------------------------------------------------------------------------------------
# Identity and sidecar files.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CacheIdentity:
    """What makes two sidecars interchangeable: same encoder, same texts, same layout."""

    fingerprint: str
    """Stage-1 encoder fingerprint (weights hash, pooling, max length, instruction)."""
    pooling: str
    """Encoder pooling (mean, latent_attention, last_token)."""
    max_length: int
    """Encoder max tokens per text (longer reports are truncated by the encoder)."""
    instruction: str | None
    """Task instruction prepended to every text (excluded from pooling)."""
    variants: tuple[str, ...]
    """Column names of the middle axis, e.g. ("report", "negated")."""
    dim: int
    """Embedding width."""
    dtype: str
    """Storage dtype: fp16 or fp32."""
    text: str = TEXT_SPEC
    """Which text of a report the columns derive from (``llmclip.data.text.TEXT_SPEC``)."""

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["variants"] = list(self.variants)
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> CacheIdentity:
        try:
            return cls(
                fingerprint=str(d["fingerprint"]),
                pooling=str(d["pooling"]),
                max_length=int(d["max_length"]),
                instruction=d["instruction"] if d["instruction"] is None else str(d["instruction"]),
                variants=tuple(str(v) for v in d["variants"]),
                dim=int(d["dim"]),
                dtype=str(d["dtype"]),
                # A cache written before the text was recorded read the whole report ("full").
                text=str(d.get("text", "full")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: malformed cache identity ({e!r})") from None

    def differences(self, other: CacheIdentity) -> list[str]:
        a, b = self.to_json(), other.to_json()
        return [f"{k}: {b[k]!r} != {a[k]!r}" for k in a if a[k] != b[k]]


def emb_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / f"{name}.emb.npy"


def keys_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / f"{name}.keys.json"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def _atomic_write(path: Path, write) -> Path:
    """Write through ``write(f)`` to a temp file, fsync; return the temp path (rename is the caller's)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path), open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk gets its space back; the rerun redoes the file
        raise
    return tmp


def write_sidecar(
    cache_dir: Path,
    name: str,
    keys: list[str],
    emb: np.ndarray,
    ident: CacheIdentity,
    source_sha256: str | None = None,
) -> None:
    """Write one shard's rows; the ``.emb.npy`` appears last, so its presence means complete.

    ``source_sha256``: checksum of the shard the rows were read from (manifest), so a resumed build
    redoes a sidecar whose shard was rebuilt under the same name.
    """
    side = {"shard": name, "keys": keys, "build": ident.to_json(), "source_sha256": source_sha256}
    body = json.dumps(side).encode("utf-8")
    tmp_keys = _atomic_write(keys_path(cache_dir, name), lambda f: f.write(body))
    try:
        tmp_emb = _atomic_write(
            emb_path(cache_dir, name), lambda f: np.save(f, emb, allow_pickle=False)
        )
    except BaseException:
        tmp_keys.unlink(missing_ok=True)
        raise
    os.replace(tmp_keys, keys_path(cache_dir, name))
    os.replace(tmp_emb, emb_path(cache_dir, name))


def load_rows(path: Path) -> np.ndarray:
    """Memory-map one sidecar (header checked by numpy, never unpickled)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def read_sidecar_keys(cache_dir: Path, name: str) -> tuple[list[str], CacheIdentity]:
    path = keys_path(cache_dir, name)
    d = _read_json(path)
    if not isinstance(d, dict) or not isinstance(d.get("keys"), list):
        raise ConfigError(f"{path}: not a keys file (no 'keys' list)")
    return [str(k) for k in d["keys"]], CacheIdentity.from_json(d.get("build"), str(path))


def sidecar_state(
    cache_dir: Path, name: str, ident: CacheIdentity | None = None
) -> tuple[str, Any]:
    """("missing"|"partial"|"complete"|"foreign", detail) of one shard's sidecar.

    Complete means: both files present, keys readable, array shape [len(keys), variants, dim] with
    the stored dtype, and (when ``ident`` is given) the same identity. A header-only read.
    """
    emb, keys = emb_path(cache_dir, name), keys_path(cache_dir, name)
    if not emb.exists():
        return ("partial", "keys without embeddings") if keys.exists() else ("missing", None)
    try:
        key_list, their = read_sidecar_keys(cache_dir, name)
        arr = load_rows(emb)
    except ConfigError as e:
        return "partial", str(e)
    if ident is not None and their != ident:
        return "foreign", their
    want = (len(key_list), len(their.variants), their.dim)
    if arr.shape != want or arr.dtype != np.dtype(DTYPES.get(their.dtype, np.float16)):
        return "partial", f"array {arr.shape} {arr.dtype}, expected {want} {their.dtype}"
    return "complete", len(key_list)


def sidecar_names(cache_dir: Path) -> list[str]:
    """Names of every sidecar in the folder (complete or not), from either file."""
    names = {shard_name(p) for p in cache_dir.glob("*.emb.npy")}
    names |= {shard_name(p) for p in cache_dir.glob("*.keys.json")}
    return sorted(names)


def write_meta(cache_dir: Path, ident: CacheIdentity, counts: dict[str, int]) -> None:
    meta = {"format": FORMAT, **ident.to_json(), "shards": dict(sorted(counts.items()))}
    body = (json.dumps(meta, indent=1) + "\n").encode("utf-8")
    os.replace(_atomic_write(cache_dir / META, lambda f: f.write(body)), cache_dir / META)


def read_meta(cache_dir: Path) -> tuple[CacheIdentity, dict[str, int]]:
    path = cache_dir / META
    if not path.is_file():
        raise ConfigError(
            f"{cache_dir} is not a finished embedding cache (no {META}; build it, or "
            "rerun `llmclip cache build` to finish it)"
        )
    d = _read_json(path)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ConfigError(
            f"{path}: format must be {FORMAT!r}, got {d.get('format') if isinstance(d, dict) else d!r}"
        )
    shards = d.get("shards")
    if not isinstance(shards, dict) or not all(isinstance(v, int) for v in shards.values()):
        raise ConfigError(f"{path}: 'shards' must map shard names to counts")
    return CacheIdentity.from_json(d, str(path)), {str(k): int(v) for k, v in shards.items()}


# ----------------------------------------------------------------------------------------------
# Reader for stage 2.
# ----------------------------------------------------------------------------------------------


class EmbeddingCache:
    """Memory-mapped rows of a finished cache, looked up by shard and checked against sample keys."""

    def __init__(self, cache_dir: str | Path, max_open: int = 64):
        self.dir = Path(cache_dir)
        self.identity, self.counts = read_meta(self.dir)
        self.variants: list[str] = list(self.identity.variants)
        self.dim: int = self.identity.dim
        self.fingerprint: str = self.identity.fingerprint
        if self.identity.text != TEXT_SPEC:
            # Its rows would pair an image with another text than its labels and graph.
            raise CacheMismatch(
                f"{self.dir / META} was built from the report text {self.identity.text!r}, "
                f"llmclip reads {TEXT_SPEC!r}; rebuild it with `llmclip cache build --overwrite`"
            )
        self._open: OrderedDict[str, tuple[np.ndarray, list[str], dict[str, int]]] = OrderedDict()
        self._max_open = max_open

    def _shard(self, shard: Any) -> tuple[np.ndarray, list[str], dict[str, int]]:
        name = shard_name(shard)
        hit = self._open.get(name)
        if hit is not None:
            self._open.move_to_end(name)
            return hit
        if name not in self.counts:
            raise CacheMismatch(
                f"shard {name} is not in the embedding cache {self.dir} "
                f"({len(self.counts)} shards; rebuild it with these shards)"
            )
        keys, ident = read_sidecar_keys(self.dir, name)
        arr = load_rows(emb_path(self.dir, name))
        if ident != self.identity:
            raise CacheMismatch(
                f"{keys_path(self.dir, name)} was built differently from "
                f"{self.dir / META}: {'; '.join(ident.differences(self.identity))}"
            )
        if (
            arr.shape != (self.counts[name], len(self.variants), self.dim)
            or len(keys) != arr.shape[0]
        ):
            raise CacheMismatch(
                f"{emb_path(self.dir, name)}: shape {arr.shape} with {len(keys)} keys "
                f"does not match meta count {self.counts[name]}"
            )
        entry = (arr, keys, {k: i for i, k in enumerate(keys)})
        self._open[name] = entry
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return entry

    def keys(self, shard: Any) -> list[str]:
        return list(self._shard(shard)[1])

    def array(self, shard: Any) -> np.ndarray:
        """The whole memory-mapped ``[n, variants, dim]`` array of one shard (read-only)."""
        return self._shard(shard)[0]

    def variant_index(self, name: str) -> int:
        if name not in self.variants:
            raise ConfigError(f"variant {name!r} is not in the cache (has {self.variants})")
        return self.variants.index(name)

    def rows(self, shard: Any, keys: Sequence[str]) -> np.ndarray:
        """``[len(keys), variants, dim]`` rows for these samples of ``shard`` (a name, path or URL)."""
        arr, _, index = self._shard(shard)
        try:
            idx = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
        except KeyError as e:
            raise CacheMismatch(
                f"key {e.args[0]!r} of shard {shard_name(shard)} is not in the "
                f"embedding cache {self.dir}: the cache was built from other shards"
            ) from None
        out = np.asarray(arr[idx])
        finite = np.isfinite(out).all(axis=2)
        if not finite.all():  # a damaged or hostile sidecar must not train on NaN silently
            i, v = np.argwhere(~finite)[0]
            raise CacheMismatch(
                f"{emb_path(self.dir, shard_name(shard))}: row of key {keys[i]!r} (variant "
                f"{self.variants[v]!r}) holds NaN/Inf; rebuild the cache (`llmclip cache verify` "
                "finds every such row)"
            )
        return out

    def check_matches(
        self, shards: Sequence[Any], fingerprint: str | None = None, check_keys: bool = False
    ) -> None:
        """Raise ``CacheMismatch`` unless every shard (ShardInfo with ``.count``, or a path) has rows.

        Counts come from the shard manifest; ``check_keys`` also lists each shard's members and
        compares the keys in order (slower: reads tar headers). ``fingerprint``: the encoder's.
        """
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise CacheMismatch(
                f"embedding cache {self.dir} was built by encoder {self.fingerprint[:16]}..., "
                f"not {fingerprint[:16]}...: rebuild it with `llmclip cache build`"
            )
        for s in shards:
            name = shard_name(s)
            if name not in self.counts:
                raise CacheMismatch(
                    f"shard {name} is not in the embedding cache {self.dir} "
                    "(build the cache for these shards)"
                )
            count = getattr(s, "count", None)
            if count is not None and int(count) != self.counts[name]:
                raise CacheMismatch(
                    f"shard {name} has {count} samples but the embedding cache "
                    f"{self.dir} has {self.counts[name]} rows: it is stale, rebuild it"
                )
            if check_keys:
                path = getattr(s, "path", s)
                theirs, ours = shard_keys(path), self.keys(name)
                if theirs != ours:
                    raise CacheMismatch(_first_key_mismatch(name, theirs, ours))


def _first_key_mismatch(name: str, shard: list[str], cache: list[str]) -> str:
    for i, (a, b) in enumerate(zip(shard, cache, strict=False)):
        if a != b:
            return f"shard {name} row {i}: shard key {a!r} != cache key {b!r}"
    return f"shard {name}: {len(shard)} samples in the shard, {len(cache)} rows in the cache"
