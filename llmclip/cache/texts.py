"""The texts the embedding cache encodes: which text of a sample each column holds, read from the
text shards through the safe tar reader (json only; nothing decoded by type or unpickled)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llmclip.config import ConfigError
from llmclip.data.safetar import MAX_JSON_BYTES, UnreadableTar, read_members, split_key
from llmclip.data.text import clinical_text

# ----------------------------------------------------------------------------------------------
# Variants: which text of a sample each column holds.
# ----------------------------------------------------------------------------------------------


def _section(report: dict[str, Any], name: str) -> str:
    value = report.get(name) or ""
    return value.strip() if isinstance(value, str) else ""


def _negated(report: dict[str, Any]) -> str:
    from llmclip.clinical import negate  # the clinical toolkit owns negation

    return negate(clinical_text(report))


def _one_error(kind: str) -> Callable[[dict[str, Any]], str]:
    """Column of the clinical text with the training-family edit of ``kind`` (``one_edit``), or the
    text itself when the report offers none (stage 2 masks that row as identical)."""

    def column(report: dict[str, Any]) -> str:
        from llmclip.clinical.edits import one_edit  # the clinical toolkit owns the edits

        text = clinical_text(report)
        return one_edit(text, kind) or text

    return column


# Column name -> text of a sample's ``report`` dict. Every column derives from the one clinical text
# (findings + impression, ``llmclip.data.text``), the text the labels and graphs are made from.
# Section variants fall back to it when the section is absent (impression-only or findings-only
# reports are common), and edit variants when the report has no such fact, so every key has a row.
VARIANTS = {
    "report": clinical_text,
    "negated": _negated,
    "laterality": _one_error("laterality_swap"),
    "severity": _one_error("severity_change"),
    "impression": lambda r: _section(r, "impression") or clinical_text(r),
    "findings": lambda r: _section(r, "findings") or clinical_text(r),
}


def parse_variants(spec: str | Sequence[str]) -> list[str]:
    names = [v.strip() for v in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise ConfigError("needs at least one variant", "variants")
    for n in names:
        if n not in VARIANTS:
            raise ConfigError(
                f"unknown variant {n!r} (choose from {', '.join(VARIANTS)})", "variants"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate variant in {names}", "variants")
    return names


# ----------------------------------------------------------------------------------------------
# Reading text shards: the safe tar reader, json only (nothing decoded by type or unpickled).
# ----------------------------------------------------------------------------------------------


def read_reports(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, report sections) for each sample of a text (or image) shard, in shard order."""

    def finish(key: str | None, js: bytes | None) -> Iterator[tuple[str, dict[str, Any]]]:
        if key is None:
            return
        if js is None:
            raise ConfigError(f"{path}: sample {key!r} has no json member")
        try:
            meta = json.loads(js.decode("utf-8"))
            report = meta["report"]
            if not isinstance(report, dict) or not clinical_text(report):
                raise ValueError("no findings or impression")
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: sample {key!r} has no readable report ({e})") from None
        yield key, report

    key: str | None = None
    js: bytes | None = None
    seen: set[str] = set()
    try:
        for m in read_members(path, read=lambda name: name.endswith(".json"),
                              max_bytes=MAX_JSON_BYTES):
            k, ext = split_key(m.name) or (m.name, "")
            if k != key:
                yield from finish(key, js)
                if k in seen:
                    raise ConfigError(f"{path}: key {k!r} appears twice (members not grouped)")
                seen.add(k)
                key, js = k, None
            if ext == "json":
                if m.oversized:
                    raise ConfigError(f"{path}: {m.name} is {m.size} bytes, not a report")
                js = m.data
        yield from finish(key, js)
    except UnreadableTar as e:
        raise ConfigError(f"cannot read shard {e}") from None
