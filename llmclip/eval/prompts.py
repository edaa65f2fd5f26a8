"""Zero-shot prompt ensembles per CheXpert finding: positive vs negative report sentences.

Positive prompts cross severity x location x subtype, as in "Bringing CLIP to the clinic"
(CheXpert 5x200 prompts), written as report sentences so they resemble what the text tower saw in
training. A class score is the similarity to the mean positive prompt embedding minus the
similarity to the mean negative one (CLIP-style ensembles: mean of normalised embeddings).
"""

from __future__ import annotations

from itertools import product

SEVERITIES = ("mild", "moderate", "large")
SIDES = ("left", "right", "bilateral")
ZONES = ("upper", "lower")


def _cap(s: str) -> str:
    return s[0].upper() + s[1:] + "."


def _grid(template: str, **axes: tuple[str, ...]) -> list[str]:
    names = list(axes)
    return [
        _cap(template.format(**dict(zip(names, vals, strict=True))))
        for vals in product(*axes.values())
    ]


PROMPTS: dict[str, dict[str, list[str]]] = {
    "Enlarged Cardiomediastinum": {
        "positive": [
            "The mediastinum is widened.",
            "Enlarged cardiomediastinal silhouette.",
            "Mediastinal widening.",
        ],
        "negative": [
            "The mediastinal contours are normal.",
            "Normal cardiomediastinal silhouette.",
            "No mediastinal widening.",
        ],
    },
    "Cardiomegaly": {
        "positive": ["Cardiomegaly.", "The heart is enlarged.", "Enlarged cardiac silhouette."]
        + _grid("{sev} cardiomegaly", sev=("mild", "moderate", "severe")),
        "negative": [
            "No cardiomegaly.",
            "The heart size is normal.",
            "Normal heart size.",
            "The cardiac silhouette is within normal limits.",
        ],
    },
    "Lung Lesion": {
        "positive": ["Pulmonary nodule.", "Lung mass."]
        + _grid("{side} {zone} lobe nodule", side=SIDES[:2], zone=ZONES),
        "negative": ["No pulmonary nodules.", "No lung nodule or mass.", "No focal lung lesion."],
    },
    "Lung Opacity": {
        "positive": ["Airspace opacity."]
        + _grid("{side} {zone} lung opacity", side=SIDES, zone=ZONES),
        "negative": ["No focal opacity.", "The lungs are clear.", "No airspace opacity."],
    },
    "Edema": {
        "positive": [
            "Pulmonary edema.",
            "Interstitial edema.",
            "Pulmonary vascular congestion and edema.",
        ]
        + _grid("{sev} pulmonary edema", sev=SEVERITIES),
        "negative": ["No pulmonary edema.", "No edema.", "No vascular congestion."],
    },
    "Consolidation": {
        "positive": ["Consolidation.", "Airspace consolidation."]
        + _grid("{side} {zone} lobe consolidation", side=SIDES[:2], zone=ZONES),
        "negative": ["No consolidation.", "No focal consolidation.", "The lungs are clear."],
    },
    "Pneumonia": {
        "positive": ["Pneumonia.", "Findings consistent with pneumonia."]
        + _grid("{side} {zone} lobe pneumonia", side=SIDES[:2], zone=ZONES),
        "negative": ["No pneumonia.", "No evidence of pneumonia.", "The lungs are clear."],
    },
    "Atelectasis": {
        "positive": ["Atelectasis.", "Subsegmental atelectasis."]
        + _grid("{side} basilar atelectasis", side=SIDES)
        + _grid("{sev} atelectasis", sev=SEVERITIES),
        "negative": ["No atelectasis.", "The lungs are clear.", "No volume loss."],
    },
    "Pneumothorax": {
        "positive": ["Pneumothorax."]
        + _grid("{sev} {side} pneumothorax", sev=("small", "moderate", "large"), side=SIDES[:2]),
        "negative": ["No pneumothorax.", "There is no pneumothorax."],
    },
    "Pleural Effusion": {
        "positive": ["Pleural effusion."]
        + _grid("{sev} {side} pleural effusion", sev=("small", "moderate", "large"), side=SIDES),
        "negative": ["No pleural effusion.", "No effusion.", "The costophrenic angles are sharp."],
    },
    "Pleural Other": {
        "positive": ["Pleural thickening."] + _grid("{side} pleural thickening", side=SIDES),
        "negative": ["No pleural thickening.", "No pleural abnormality."],
    },
    "Fracture": {
        "positive": ["Rib fracture.", "Healed rib fracture."]
        + _grid("{side} rib fracture", side=SIDES[:2]),
        "negative": [
            "No fracture.",
            "No acute bony abnormality.",
            "The osseous structures are intact.",
        ],
    },
    "Support Devices": {
        "positive": [
            "Pacemaker in place.",
            "Central venous catheter.",
            "Endotracheal tube in place.",
            "Nasogastric tube in place.",
            "Chest tube in place.",
            "Support devices in place.",
        ],
        "negative": ["No support devices.", "No lines or tubes."],
    },
    "No Finding": {
        "positive": [
            "No acute cardiopulmonary abnormality.",
            "Normal chest.",
            "The heart and lungs are normal.",
        ],
        "negative": ["Acute cardiopulmonary abnormality.", "Abnormal chest radiograph."],
    },
}

# CheXpert 5x200: five findings; images positive for exactly one of them are classified among them.
COMPETITION_5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def all_prompts() -> list[str]:
    """Every prompt once, in a stable order (what the text encoder embeds)."""
    seen: dict[str, None] = {}
    for cls in PROMPTS.values():
        for side in ("positive", "negative"):
            for p in cls[side]:
                seen.setdefault(p, None)
    return list(seen)
