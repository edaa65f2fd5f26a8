"""What a phantom shows: the findings a report's labeler mentions ask the renderer to draw.

The labeler's vocabulary is wider than what the renderer can draw (synonyms, device wording), so it
is narrowed here to CheXpert classes, a side, a severity word and a device kind. This module has no
drawing code, so readers of the vocabulary (evaluation) do not load the renderer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

SEVERITY = {
    "trace": 0.15,
    "minimal": 0.2,
    "tiny": 0.2,
    "small": 0.35,
    "mild": 0.35,
    "borderline": 0.25,
    "moderate": 0.6,
    "large": 0.9,
    "severe": 0.9,
    "marked": 0.9,
    "extensive": 0.95,
    "massive": 1.0,
}
_OBS = {
    "cardiomegaly": "Cardiomegaly",
    "enlarged cardiomediastinum": "Enlarged Cardiomediastinum",
    "pleural effusion": "Pleural Effusion",
    "effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "lung opacity": "Lung Opacity",
    "opacity": "Lung Opacity",
    "atelectasis": "Atelectasis",
    "edema": "Edema",
    "pulmonary edema": "Edema",
    "lung lesion": "Lung Lesion",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "support devices": "Support Devices",
    "fracture": "Fracture",
    "pleural other": "Pleural Other",
    "pleural thickening": "Pleural Other",
}
_DEVICES = (
    ("pacemaker", re.compile(r"pacemaker|pacer|icd|defibrillator|cardiac device", re.I)),
    ("wires", re.compile(r"sternotomy|sternal wire", re.I)),
    ("clips", re.compile(r"clip", re.I)),
    ("valve", re.compile(r"valve", re.I)),
    ("et", re.compile(r"endotracheal|\bet\b|\bett\b|tracheostomy", re.I)),
    ("ng", re.compile(r"nasogastric|enteric|\bng\b|\bog\b|feeding tube|dobhoff|orogastric", re.I)),
    ("chest_tube", re.compile(r"chest tube|pleural (drain|catheter)|pigtail", re.I)),
    ("line", re.compile(r"line|catheter|picc|port", re.I)),
)


@dataclass(frozen=True)
class Finding:
    """One positive (or uncertain) finding to draw."""

    observation: str
    """CheXpert class name (synonyms such as 'effusion' or 'nodule' are accepted)."""
    laterality: str | None = None
    """'left', 'right', 'bilateral' or None (side then chosen from the key)."""
    severity: str | None = None
    """A severity word (trace, small, mild, moderate, large, severe...) or None (moderate-ish)."""
    uncertain: bool = False
    """Drawn faint: the report only suggests it."""
    device: str | None = None
    """For Support Devices: pacemaker, wires, clips, valve, et, ng, chest_tube or line (None: line)."""


@dataclass(frozen=True)
class PhantomSpec:
    """Everything the renderer draws; built from labeler mentions or by hand in tests."""

    findings: tuple[Finding, ...] = field(default_factory=tuple)

    def has(self, observation: str) -> bool:
        return any(f.observation == observation for f in self.findings)


def canonical_observation(name: str) -> str | None:
    """Map an observation name or synonym to the CheXpert class the renderer draws (None: not drawn)."""
    return _OBS.get(str(name).strip().lower())


def device_kind(sentence: str) -> str:
    for kind, pattern in _DEVICES:
        if pattern.search(sentence or ""):
            return kind
    return "line"


def spec_from_mentions(mentions: Iterable) -> PhantomSpec:
    """Spec from labeler mentions (objects with observation, status, laterality, severity, sentence).

    Positive mentions are drawn, uncertain ones faintly, negative ones not at all.
    """
    found = []
    for m in mentions:
        status = getattr(m, "status", "positive")
        obs = canonical_observation(getattr(m, "observation", ""))
        if obs is None or status not in ("positive", "uncertain"):
            continue
        sentence = f"{getattr(m, 'term', '') or ''} {getattr(m, 'sentence', '') or ''}"
        found.append(
            Finding(
                observation=obs,
                laterality=getattr(m, "laterality", None),
                severity=getattr(m, "severity", None),
                uncertain=status == "uncertain",
                device=device_kind(sentence) if obs == "Support Devices" else None,
            )
        )
    return PhantomSpec(tuple(found))
