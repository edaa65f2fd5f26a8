"""CheXpert Plus: a report CSV with sections and PNG images.

``--root`` is the CheXpert Plus folder:
- ``df_chexpert_plus_*.csv`` (any ``df_chexpert_plus*.csv[.gz]``): ``path_to_image``,
  ``deid_patient_id``, ``frontal_lateral``, ``ap_pa``, ``report`` and the ``section_*`` columns
  (findings, impression, clinical_history, history, comparison...), optionally ``split``;
- PNGs at ``PNG/<path_to_image with .png>`` (or ``<path_to_image>`` itself under the root);
- optional CheXbert labels ``chexbert_labels/impression_fixed.json`` (else ``findings_fixed.json``):
  JSON lines with ``path_to_image`` and the 14 CheXpert classes (1 / 0 / -1 / null), label_source
  ``"chexpert"``. Without them the Labeler labels the report.
Section columns are used when filled; otherwise the free-text ``report`` is parsed.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmclip.config import ConfigError
from llmclip.data.reports import ReportSections, parse_report
from llmclip.data.sources import Record, has_undecodable, make_key, require_root
from llmclip.data.sources.mimic_cxr import CHEXPERT_COLUMNS

NAME = "chexpert-plus"
_SECTIONS = {
    "findings": ("section_findings",),
    "impression": ("section_impression", "section_summary"),
    "indication": ("section_indication",),
    "history": ("section_clinical_history", "section_history"),
    "comparison": ("section_comparison",),
}
_SPLITS = {"train": "train", "valid": "val", "validate": "val", "val": "val", "test": "test"}


def _report(row: dict[str, str]) -> ReportSections:
    parts = {k: " ".join(row.get(c) or "" for c in cols).strip() for k, cols in _SECTIONS.items()}
    if parts["findings"] or parts["impression"]:
        return ReportSections.from_parts(**parts)
    return parse_report(row.get("report") or "")


def load_chexbert(root: Path) -> dict[str, dict[str, int]]:
    for name in ("impression_fixed.json", "findings_fixed.json"):
        p = root / "chexbert_labels" / name
        if not p.is_file():
            continue
        out = {}
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    out[row["path_to_image"]] = {
                        c: int(row[c]) for c in CHEXPERT_COLUMNS if row.get(c) is not None
                    }
                except (ValueError, KeyError, TypeError) as e:
                    raise ConfigError(f"{p}:{n}: bad label line: {e}", "--root") from None
        return out
    return {}


@dataclass
class CheXpertPlusSource:
    root: Path
    csv_path: Path
    render: bool
    name: str = NAME
    default_images: str | None = None
    total: int | None = None

    @property
    def has_images(self) -> bool:
        return not self.render

    def _image(self, rel: str) -> Path:
        png = self.root / "PNG" / Path(rel).with_suffix(".png")
        return png if png.exists() else self.root / rel

    def __iter__(self) -> Iterator[Record]:
        labels = load_chexbert(self.root)
        csv.field_size_limit(min(sys.maxsize, 1 << 28))
        raw = (
            gzip.open(self.csv_path, "rb")
            if self.csv_path.suffix == ".gz"
            else open(self.csv_path, "rb")
        )
        with io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="") as f:
            for n, row in enumerate(csv.DictReader(f)):
                rel = row.get("path_to_image") or ""
                key = make_key(
                    "chexpertplus", str(Path(rel).with_suffix("")).replace("/", "-") or n
                )
                pid = row.get("deid_patient_id") or Path(rel).parent.parent.name or key
                sid = f"{pid}-{Path(rel).parent.name}"
                if not rel:
                    yield Record(key, NAME, pid, sid, error="missing_image_path")
                    continue
                if has_undecodable(*row.values()):
                    yield Record(key, NAME, pid, sid, error="bad_encoding")
                    continue
                lab = labels.get(rel)
                view = row.get("ap_pa") or row.get("frontal_lateral") or ""
                yield Record(
                    key,
                    NAME,
                    pid,
                    sid,
                    rel,
                    view,
                    _report(row),
                    labels=lab,
                    label_source="chexpert" if lab is not None else None,
                    image_path=None if self.render else self._image(rel),
                    split=_SPLITS.get((row.get("split") or "").lower()),
                )


def open_source(root: Path | None, images: str | None) -> CheXpertPlusSource:
    root = require_root(root, NAME)
    hits = sorted(root.glob("df_chexpert_plus*.csv")) + sorted(
        root.glob("df_chexpert_plus*.csv.gz")
    )
    if not hits:
        raise ConfigError(f"no df_chexpert_plus*.csv in {root}", "--root")
    if images not in (None, "render"):
        raise ConfigError(
            "CheXpert Plus images are read from --root; use --images render or omit it", "--images"
        )
    return CheXpertPlusSource(root, hits[0], render=images == "render")
