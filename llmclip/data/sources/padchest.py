"""PadChest (160K images, 67K patients, Spanish reports; the label CSV ships in torchxrayvision).

The CSV is streamed row by row (gzip + csv), so memory stays flat whatever its size. Reports are
Spanish, lower-cased and stemmed ("sin hallazg patolog edad pacient"); they carry no section headers,
so the whole text is the findings. Without ``--images`` the source is text-only; with
``--images PATH`` the PNG for a row is ``PATH/<ImageDir>/<ImageID>`` or ``PATH/<ImageID>``.

Labels: PadChest's own ``Labels`` column (174 findings; 27% by physicians, the rest by its RNN:
``label_method`` in the json says which) is kept verbatim as ``padchest_labels`` and mapped to CheXpert
classes where the meaning is the same (table below). PadChest lists only findings that are present,
so mapped classes are 1 and everything else is absent; label_source is ``"padchest"``.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmclip import assets
from llmclip.config import ConfigError
from llmclip.data.reports import parse_report
from llmclip.data.sources import Record, has_undecodable, make_key

NAME = "padchest"
TOTAL_ROWS = 160_861  # rows of the released CSV (used only for the progress bar)

# PadChest label -> CheXpert class, only where the meaning is the same finding.
CHEXPERT_MAP: dict[str, str] = {
    "normal": "No Finding",
    "cardiomegaly": "Cardiomegaly",
    "mediastinal enlargement": "Enlarged Cardiomediastinum",
    "superior mediastinal enlargement": "Enlarged Cardiomediastinum",
    "pleural effusion": "Pleural Effusion",
    "loculated pleural effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "hydropneumothorax": "Pneumothorax",
    "atelectasis": "Atelectasis",
    "laminar atelectasis": "Atelectasis",
    "lobar atelectasis": "Atelectasis",
    "segmental atelectasis": "Atelectasis",
    "total atelectasis": "Atelectasis",
    "round atelectasis": "Atelectasis",
    "atelectasis basal": "Atelectasis",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "atypical pneumonia": "Pneumonia",
    "pulmonary edema": "Edema",
    "nodule": "Lung Lesion",
    "multiple nodules": "Lung Lesion",
    "pulmonary mass": "Lung Lesion",
    "mass": "Lung Lesion",
    "lung metastasis": "Lung Lesion",
    "infiltrates": "Lung Opacity",
    "alveolar pattern": "Lung Opacity",
    "interstitial pattern": "Lung Opacity",
    "reticular interstitial pattern": "Lung Opacity",
    "reticulonodular interstitial pattern": "Lung Opacity",
    "ground glass pattern": "Lung Opacity",
    "increased density": "Lung Opacity",
    "rib fracture": "Fracture",
    "callus rib fracture": "Fracture",
    "clavicle fracture": "Fracture",
    "vertebral fracture": "Fracture",
    "humeral fracture": "Fracture",
    "fracture": "Fracture",
    "pleural thickening": "Pleural Other",
    "apical pleural thickening": "Pleural Other",
    "calcified pleural thickening": "Pleural Other",
    "pleural plaques": "Pleural Other",
    "calcified pleural plaques": "Pleural Other",
    "pacemaker": "Support Devices",
    "dual chamber device": "Support Devices",
    "single chamber device": "Support Devices",
    "electrical device": "Support Devices",
    "nsg tube": "Support Devices",
    "endotracheal tube": "Support Devices",
    "tracheostomy tube": "Support Devices",
    "chest drain tube": "Support Devices",
    "central venous catheter": "Support Devices",
    "central venous catheter via jugular vein": "Support Devices",
    "central venous catheter via subclavian vein": "Support Devices",
    "central venous catheter via umbilical vein": "Support Devices",
    "reservoir central venous catheter": "Support Devices",
    "catheter": "Support Devices",
}
_QUOTED = re.compile(r"'([^']*)'")


def parse_list(cell: str) -> list[str]:
    """PadChest list cells look like "['normal', 'kyphosis']"; read the strings, never eval."""
    return [s.strip() for s in _QUOTED.findall(cell or "") if s.strip()]


def map_labels(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        cls = CHEXPERT_MAP.get(n.lower())
        if cls:
            out[cls] = 1
    return out


@dataclass
class PadChestSource:
    path: Path
    image_dir: Path | None
    name: str = NAME
    default_images: str | None = None
    total: int | None = TOTAL_ROWS

    @property
    def has_images(self) -> bool:
        return self.image_dir is not None

    def _open(self) -> io.TextIOBase:
        raw = gzip.open(self.path, "rb") if self.path.suffix == ".gz" else open(self.path, "rb")
        # surrogateescape: a non-UTF-8 byte becomes a lone surrogate instead of aborting the whole
        # stream, so the one bad row is counted (bad_encoding) and the rest is read.
        return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")

    def __iter__(self) -> Iterator[Record]:
        csv.field_size_limit(min(sys.maxsize, 1 << 28))
        with self._open() as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                raise ConfigError(f"{self.path}: empty CSV", "--root") from None
            need = ("ImageID", "PatientID", "StudyID", "Report", "Labels")
            missing = [c for c in need if c not in header]
            if missing:
                raise ConfigError(
                    f"{self.path}: not a PadChest CSV, missing columns {missing}", "--root"
                )
            col = {c: i for i, c in enumerate(header)}
            get = lambda row, c: row[col[c]] if c in col and col[c] < len(row) else ""  # noqa: E731
            for n, row in enumerate(reader):
                image_id = get(row, "ImageID")
                key = make_key(NAME, Path(image_id).stem or f"row{n}")
                pid, sid = get(row, "PatientID"), get(row, "StudyID")
                if len(row) != len(header):
                    yield Record(key, NAME, pid or key, sid or key, error="bad_row")
                    continue
                text = get(row, "Report")
                if has_undecodable(text):
                    yield Record(key, NAME, pid or key, sid or key, error="bad_encoding")
                    continue
                names = parse_list(get(row, "Labels"))
                image_path = None
                if self.image_dir is not None:
                    image_path = self.image_dir / get(row, "ImageDir") / image_id
                    if not image_path.exists():
                        image_path = self.image_dir / image_id
                yield Record(
                    key,
                    NAME,
                    pid or key,
                    sid or key,
                    image_id,
                    get(row, "Projection"),
                    parse_report(text),
                    labels=map_labels(names),
                    label_source="padchest",
                    image_path=image_path,
                    extra={
                        "padchest_labels": names,
                        "label_method": get(row, "MethodLabel"),
                        "localizations": parse_list(get(row, "Localizations")),
                    },
                )


def open_source(root: Path | None, images: str | None) -> PadChestSource:
    path = root if root is not None else assets.padchest_csv()
    if not path.is_file():
        raise ConfigError(f"PadChest CSV not found: {path}", "--root")
    image_dir = None
    if images == "render":
        raise ConfigError(
            "PadChest reports are Spanish; phantoms are rendered from English reports "
            "only. Omit --images for text-only shards or give the PNG folder",
            "--images",
        )
    if images is not None:
        image_dir = Path(images)
        if not image_dir.is_dir():
            raise ConfigError(f"image folder not found: {image_dir}", "--images")
    return PadChestSource(path, image_dir, total=TOTAL_ROWS if root is None else None)
