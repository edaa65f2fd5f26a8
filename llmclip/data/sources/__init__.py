"""Source readers: one module per dataset, each turning its files into a stream of ``Record``s.

A reader yields records in a deterministic order (the builder's resume relies on it), never loads
images, and reports a record it cannot read as a ``Record`` with ``error`` set instead of dropping
it, so every input is either written or counted.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmclip.config import ConfigError
from llmclip.data.reports import ReportSections

# --source NAME -> module. Each module defines ``open_source(root, images) -> Source``.
SOURCES: dict[str, str] = {
    "openi": "llmclip.data.sources.openi",
    "mimic-cxr": "llmclip.data.sources.mimic_cxr",
    "chexpert-plus": "llmclip.data.sources.chexpert_plus",
    "padchest": "llmclip.data.sources.padchest",
    "csv": "llmclip.data.sources.csv",
}

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(*parts: Any) -> str:
    """A WebDataset key: no dots (WebDataset splits names at the first dot), no slashes or spaces."""
    return "-".join(_BAD_KEY_CHARS.sub("_", str(p)).strip("_") for p in parts)


@dataclass
class Record:
    """One image (or one text-only report) as read from a source, before labels and pixels."""

    key: str
    source: str
    patient_id: str
    study_id: str
    image_id: str = ""
    view: str = ""
    report: ReportSections = field(default_factory=ReportSections)
    labels: dict[str, int] | None = None
    """CheXpert labels from the dataset itself; None means the builder runs the Labeler."""
    label_source: str | None = None
    image_path: Path | None = None
    split: str | None = None
    """The dataset's official split (train/val/test) when it has one, else None."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Source-specific fields kept in the sample json (e.g. Open-I MeSH terms)."""
    error: str | None = None
    """Why this record cannot be used (e.g. 'bad_encoding'); the builder counts it as skipped."""


class Source(Protocol):
    name: str
    has_images: bool
    """The source provides pixels itself (a folder of images); False: text-only unless rendered."""
    total: int | None
    """Number of records if known cheaply (for the progress bar)."""
    default_images: str | None
    """What ``--images`` means when omitted: "render" for sources without pixels to offer."""

    def __iter__(self) -> Iterator[Record]: ...


def open_source(name: str, root: str | None, images: str | None) -> Source:
    """The reader for ``--source NAME`` over ``--root``; unknown names fail with the valid ones."""
    if name not in SOURCES:
        raise ConfigError(
            f"unknown source {name!r}; valid sources: {', '.join(SOURCES)}", "--source"
        )
    module = importlib.import_module(SOURCES[name])
    return module.open_source(Path(root) if root else None, images)


def require_root(root: Path | None, source: str) -> Path:
    if root is None:
        raise ConfigError(f"source {source!r} needs --root (the dataset folder or file)", "--root")
    if not root.exists():
        raise ConfigError(f"not found: {root}", "--root")
    return root


_SURROGATE = re.compile("[\udc80-\udcff]")


def has_undecodable(*texts: str | None) -> bool:
    """True when text read with errors="surrogateescape" held bytes that are not UTF-8."""
    return any(isinstance(t, str) and _SURROGATE.search(t) is not None for t in texts)


def decode_text(data: bytes) -> str | None:
    """UTF-8 text, or None when the bytes are not UTF-8 (the record is then counted as bad)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
