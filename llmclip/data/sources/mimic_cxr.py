"""MIMIC-CXR-JPG: JPEGs in ``files/p10/p10000032/s50414267/<dicom_id>.jpg`` plus CSVs and reports.

``--root`` is the MIMIC-CXR-JPG folder. Read from it (``.csv`` or ``.csv.gz``):
- ``mimic-cxr-2.0.0-metadata.csv``: dicom_id, subject_id, study_id, ViewPosition (the image list and
  its order; without it the ``files/`` tree is walked in sorted order and views are unknown);
- ``mimic-cxr-2.0.0-split.csv``: the official patient-level split (train / validate / test);
- ``mimic-cxr-2.0.0-chexpert.csv``: CheXpert labels per study (1 / 0 / -1 / blank), label_source
  ``"chexpert"``; studies without a row are labelled by the Labeler instead.
The free-text reports (``s50414267.txt``, from MIMIC-CXR's ``mimic-cxr-reports.zip``, extracted) are
looked up under ``reports/files/``, ``mimic-cxr-reports/files/`` and ``files/`` of the root.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmclip.clinical.lexicon import CHEXPERT_CLASSES
from llmclip.config import ConfigError
from llmclip.data.reports import parse_report
from llmclip.data.sources import Record, decode_text, make_key, require_root

NAME = "mimic-cxr"
# CheXpert label CSV columns are the 14 observations, in CheXpert order.
CHEXPERT_COLUMNS = tuple(CHEXPERT_CLASSES)
_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}
REPORT_DIRS = ("reports/files", "mimic-cxr-reports/files", "files")


def find_csv(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (root / name).is_file():
            return root / name
    return None


def read_csv(path: Path) -> Iterator[dict[str, str]]:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    with io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
        try:
            yield from csv.DictReader(f)
        except (UnicodeDecodeError, csv.Error) as e:
            raise ConfigError(f"{path}: cannot read CSV: {e}", "--root") from None


def chexpert_labels(row: dict[str, str], columns=CHEXPERT_COLUMNS) -> dict[str, int]:
    """CheXpert CSV cells ('1.0', '0.0', '-1.0', '') as {class: 1 | 0 | -1}; blank = not mentioned."""
    out = {}
    for c in columns:
        v = (row.get(c) or "").strip()
        if v:
            try:
                out[c] = int(float(v))
            except ValueError:
                raise ConfigError(
                    f"label {c!r} has value {v!r}; expected 1, 0, -1 or blank"
                ) from None
    return out


def _digits(s: str) -> str:
    return s.lstrip("ps")


@dataclass
class MimicSource:
    root: Path
    render: bool
    name: str = NAME
    default_images: str | None = None
    total: int | None = None
    _report_cache: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    @property
    def has_images(self) -> bool:
        return not self.render

    def _images(self) -> Iterator[tuple[str, str, str, str]]:
        """(dicom_id, subject_id, study_id, view) in a stable order."""
        meta = find_csv(self.root, "mimic-cxr-2.0.0-metadata")
        if meta is not None:
            for row in read_csv(meta):
                yield (
                    row["dicom_id"],
                    row["subject_id"],
                    row["study_id"],
                    row.get("ViewPosition", ""),
                )
            return
        files = self.root / "files"
        if not files.is_dir():
            raise ConfigError(
                f"{self.root} has neither mimic-cxr-2.0.0-metadata.csv nor files/", "--root"
            )
        for jpg in sorted(files.glob("p*/p*/s*/*.jpg")):
            yield jpg.stem, _digits(jpg.parent.parent.name), _digits(jpg.parent.name), ""

    def _report(self, subject: str, study: str) -> tuple[str | None, str | None]:
        """(text, error) of a study's report; cached because a study has several images."""
        if study in self._report_cache:
            return self._report_cache[study]
        rel = Path(f"p{subject[:2]}") / f"p{subject}" / f"s{study}.txt"
        result: tuple[str | None, str | None] = (None, "missing_report")
        for d in REPORT_DIRS:
            p = self.root / d / rel
            if p.is_file():
                text = decode_text(p.read_bytes())
                result = (text, None) if text is not None else (None, "bad_encoding")
                break
        self._report_cache.clear()  # images of a study are consecutive: keep one study only
        self._report_cache[study] = result
        return result

    def __iter__(self) -> Iterator[Record]:
        split_csv = find_csv(self.root, "mimic-cxr-2.0.0-split")
        splits = (
            {r["dicom_id"]: _SPLITS.get(r["split"], r["split"]) for r in read_csv(split_csv)}
            if split_csv
            else {}
        )
        label_csv = find_csv(self.root, "mimic-cxr-2.0.0-chexpert")
        labels = (
            {r["study_id"]: chexpert_labels(r) for r in read_csv(label_csv)} if label_csv else {}
        )
        for dicom, subject, study, view in self._images():
            key = make_key("mimic", dicom)
            pid, sid = f"p{subject}", f"s{study}"
            text, err = self._report(subject, study)
            if err:
                yield Record(key, NAME, pid, sid, dicom, view, error=err)
                continue
            lab = labels.get(study)
            yield Record(
                key,
                NAME,
                pid,
                sid,
                dicom,
                view,
                parse_report(text),
                labels=lab,
                label_source="chexpert" if lab is not None else None,
                image_path=None
                if self.render
                else self.root / "files" / f"p{subject[:2]}" / pid / sid / f"{dicom}.jpg",
                split=splits.get(dicom),
            )


def open_source(root: Path | None, images: str | None) -> MimicSource:
    root = require_root(root, NAME)
    if images not in (None, "render"):
        raise ConfigError(
            "MIMIC-CXR-JPG images are read from --root; use --images render or omit it", "--images"
        )
    return MimicSource(root, render=images == "render")
