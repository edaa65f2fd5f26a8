"""Open-I (Indiana University) reports with people-assigned MeSH terms, and their CheXpert mapping.

The 3,955 XML reports ship in torchxrayvision (``llmclip.assets.openi_reports_tgz``). Each has
AbstractText sections (COMPARISON, INDICATION, FINDINGS, IMPRESSION) and MeSH ``major`` terms
written by people as ``Head/qualifier/qualifier`` (e.g. ``Pleural Effusion/left/small``).

MeSH -> CheXpert mapping (``mesh_to_chexpert``), following the CheXpert class definitions:

=============================  ==================================================================
CheXpert class                 MeSH major heads (case-insensitive) mapped to it
=============================  ==================================================================
Enlarged Cardiomediastinum     Mediastinum/{enlarged, widened, prominent}
Cardiomegaly                   Cardiomegaly; Cardiac Shadow/{enlarged, borderline}
Lung Lesion                    Nodule; Mass; Neoplasm(s); Lung Neoplasms; Opacity/round and
                               Density/round (annotators index "nodular opacity" that way)
Lung Opacity                   Opacity, Airspace Disease, Density, Infiltrate (all in the lung or
                               unqualified); Cicatrix (lung scarring) and Markings/interstitial|reticular
                               because CheXpert's own opacity phrases include "scar" and
                               "interstitial markings"; NOT Markings/bronchovascular
Edema                          Pulmonary Edema; Pulmonary Congestion; Heart Failure (CheXpert's
                               edema phrases include vascular congestion and heart failure)
Consolidation                  Consolidation
Pneumonia                      Pneumonia
Atelectasis                    Pulmonary Atelectasis
Pneumothorax                   Pneumothorax; Hydropneumothorax; Hemopneumothorax
Pleural Effusion               Pleural Effusion; Hydropneumothorax; Hemothorax; Hemopneumothorax
Pleural Other                  Thickening/pleura, Cicatrix/pleura (pleural scarring),
                               Calcinosis/pleura (pleural plaques); Pleura/...; Fibrothorax
Fracture                       Fractures, Bone
Support Devices                Catheters, Indwelling; Implanted Medical Device; Tube, Inserted;
                               Medical Device; Stents; Surgical Instruments (clips, sternotomy
                               wires); Spinal Fusion (hardware); Sutures
No Finding                     CheXpert's rule on the mapped labels: 1 when no pathology above
                               (Support Devices excepted) is mapped and the report is indexed
=============================  ==================================================================

Not mapped (no CheXpert class): Costophrenic Angle/blunted (indexed separately from Pleural
Effusion by the annotators), Calcified Granuloma, Granulomatous Disease, Calcinosis, Emphysema,
Lung/hypoinflation, Spine and bone degeneration, Hernia, Foreign Bodies, Technical Quality.
Reports indexed "No Indexing" carry no human label and are left out of the evaluation.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from llmclip.clinical.lexicon import CHEXPERT_CLASSES
from llmclip.config import ConfigError

_HEAD_MAP: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly",),
    "nodule": ("Lung Lesion",),
    "mass": ("Lung Lesion",),
    "neoplasms": ("Lung Lesion",),
    "neoplasm": ("Lung Lesion",),
    "lung neoplasms": ("Lung Lesion",),
    "opacity": ("Lung Opacity",),
    "airspace disease": ("Lung Opacity",),
    "density": ("Lung Opacity",),
    "infiltrate": ("Lung Opacity",),
    "cicatrix": ("Lung Opacity",),
    "pulmonary edema": ("Edema",),
    "pulmonary congestion": ("Edema",),
    "heart failure": ("Edema",),
    "consolidation": ("Consolidation",),
    "pneumonia": ("Pneumonia",),
    "pulmonary atelectasis": ("Atelectasis",),
    "pneumothorax": ("Pneumothorax",),
    "hydropneumothorax": ("Pneumothorax", "Pleural Effusion"),
    "hemopneumothorax": ("Pneumothorax", "Pleural Effusion"),
    "pleural effusion": ("Pleural Effusion",),
    "hemothorax": ("Pleural Effusion",),
    "fibrothorax": ("Pleural Other",),
    "fractures, bone": ("Fracture",),
    "catheters, indwelling": ("Support Devices",),
    "implanted medical device": ("Support Devices",),
    "tube, inserted": ("Support Devices",),
    "medical device": ("Support Devices",),
    "stents": ("Support Devices",),
    "surgical instruments": ("Support Devices",),
    "spinal fusion": ("Support Devices",),
    "sutures": ("Support Devices",),
}
# CheXpert's pathologies: every class but No Finding and Support Devices.
_PATHOLOGY = tuple(c for c in CHEXPERT_CLASSES if c not in ("No Finding", "Support Devices"))


@dataclass(frozen=True)
class OpenIReport:
    """One Open-I report: sections and the people-assigned MeSH major terms."""

    uid: str
    """Report id, e.g. "CXR1"."""
    findings: str
    """FINDINGS section ('' when missing)."""
    impression: str
    """IMPRESSION section ('' when missing)."""
    indication: str
    """INDICATION section ('' when missing)."""
    comparison: str
    """COMPARISON section ('' when missing)."""
    mesh: tuple[str, ...]
    """MeSH major terms as written, e.g. ("Pleural Effusion/left/small",)."""

    @property
    def text(self) -> str:
        """Findings and impression: the text the labels are evaluated on."""
        return " ".join(t for t in (self.findings, self.impression) if t)


def read_openi(path: str | Path) -> list[OpenIReport]:
    """Every XML report in the Open-I tgz (sorted by numeric id), read and parsed by the shard
    builder's own code (``llmclip.data.sources.openi``), so the labels are evaluated on exactly the
    section texts the shards carry."""
    from llmclip.data.sources.openi import UnsafeXML, parse_xml, record_fields, xml_files

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Open-I archive not found: {path}")
    out: list[OpenIReport] = []
    for name, data in xml_files(path):
        if data is None:
            raise ConfigError(f"{path}: {name} is too large to be a report")
        try:
            uid, sec, mesh, _images = record_fields(parse_xml(data))
        except (ET.ParseError, UnsafeXML) as e:
            raise ConfigError(f"cannot read Open-I archive {path}: {name}: {e}") from e
        out.append(
            OpenIReport(
                uid=uid or Path(name).stem,
                findings=sec.findings,
                impression=sec.impression,
                indication=sec.indication,
                comparison=sec.comparison,
                mesh=tuple(mesh),
            )
        )
    out.sort(key=lambda r: int("".join(ch for ch in r.uid if ch.isdigit()) or 0))
    return out


def _map_term(term: str) -> tuple[str, ...]:
    parts = [p.strip().lower() for p in term.split("/")]
    head, quals = parts[0], set(parts[1:])
    if head in ("opacity", "density") and "round" in quals:
        # a round opacity is a nodule or mass by definition
        return ("Lung Opacity", "Lung Lesion")
    if head in ("cicatrix", "calcinosis", "thickening") and "pleura" in quals or head == "pleura":
        # pleural scarring / calcification / thickening
        return ("Pleural Other",)
    if head in _HEAD_MAP:
        return _HEAD_MAP[head]
    if head == "mediastinum" and quals & {"enlarged", "widened", "prominent"}:
        return ("Enlarged Cardiomediastinum",)
    if head == "cardiac shadow" and quals & {"enlarged", "borderline"}:
        return ("Cardiomegaly",)
    if head == "markings" and quals & {"interstitial", "reticular"}:
        return ("Lung Opacity",)
    return ()


def mesh_to_chexpert(mesh: tuple[str, ...] | list[str]) -> dict[str, int] | None:
    """CheXpert vector (positives only, plus No Finding) from MeSH major terms; None if unindexed."""
    terms = [t for t in mesh if t.strip()]
    if not terms or any(t.strip().lower() == "no indexing" for t in terms):
        return None
    labels: dict[str, int] = {}
    for t in terms:
        for c in _map_term(t):
            labels[c] = 1
    labels["No Finding"] = 0 if any(c in labels for c in _PATHOLOGY) else 1
    return labels
