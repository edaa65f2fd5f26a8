"""Any dataset as a plain CSV: one row per image (or per report for text-only shards).

``--root`` is the CSV file (``.csv`` or ``.csv.gz``, UTF-8, header row). Columns:
- ``report`` (required): the free-text report, split into sections by ``parse_report``;
- ``image`` or ``image_path`` (optional): image file, relative to the CSV's folder or absolute;
  without it the source is text-only (unless ``--images render``);
- ``patient_id``, ``study_id``, ``view``, ``split`` (train/val/test), ``key`` (optional): ids;
  without ``patient_id`` every row is its own patient;
- any of the 14 CheXpert class names as columns (1 / 0 / -1 / blank): labels with label_source
  ``"csv"``; rows without any of them are labelled by the Labeler.
"""

from __future__ import annotations

import csv
import gzip
import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmclip.config import ConfigError
from llmclip.data.reports import parse_report
from llmclip.data.sources import Record, has_undecodable, make_key, require_root
from llmclip.data.sources.mimic_cxr import CHEXPERT_COLUMNS, chexpert_labels

NAME = "csv"
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validate": "val", "test": "test"}


@dataclass
class CSVSource:
    path: Path
    render: bool
    name: str = NAME
    default_images: str | None = None
    total: int | None = None
    has_images: bool = False

    def _rows(self) -> Iterator[tuple[dict[str, str], list[str]]]:
        csv.field_size_limit(min(sys.maxsize, 1 << 28))
        raw = gzip.open(self.path, "rb") if self.path.suffix == ".gz" else open(self.path, "rb")
        with io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="") as f:
            reader = csv.DictReader(f)
            yield from ((row, reader.fieldnames or []) for row in reader)

    def __iter__(self) -> Iterator[Record]:
        base = self.path.parent
        for n, (row, fields) in enumerate(self._rows()):
            key = make_key(NAME, row.get("key") or n)
            pid = row.get("patient_id") or key
            sid = row.get("study_id") or key
            if None in row or any(v is None for v in row.values()):
                yield Record(key, NAME, pid, sid, error="bad_row")  # wrong number of cells
                continue
            if has_undecodable(*row.values()):
                yield Record(key, NAME, pid, sid, error="bad_encoding")
                continue
            image = row.get("image") or row.get("image_path") or ""
            labels = chexpert_labels(row) if any(c in fields for c in CHEXPERT_COLUMNS) else {}
            yield Record(
                key,
                NAME,
                pid,
                sid,
                image,
                row.get("view") or "",
                parse_report(row["report"]),
                labels=labels or None,
                label_source="csv" if labels else None,
                image_path=(base / image) if image and not self.render else None,
                split=_SPLITS.get((row.get("split") or "").lower()),
            )


def open_source(root: Path | None, images: str | None) -> CSVSource:
    path = require_root(root, NAME)
    if not path.is_file():
        raise ConfigError(f"--root must be the CSV file, got a folder: {path}", "--root")
    if images not in (None, "render"):
        raise ConfigError(
            "csv images come from its image column; use --images render or omit it", "--images"
        )
    src = CSVSource(path, render=images == "render")
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    with io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="") as f:
        header = next(csv.reader(f), [])
    if "report" not in header:
        raise ConfigError(f"{path}: needs a 'report' column (has {header})", "--root")
    src.has_images = not src.render and bool({"image", "image_path"} & set(header))
    return src
