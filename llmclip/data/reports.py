"""Free-text radiology reports split into sections.

Real reports (MIMIC-CXR, CheXpert Plus, Open-I) mark their sections with headers in many spellings:
``FINDINGS:``, ``Impression:``, ``CONCLUSION:``, ``REASON FOR EXAMINATION:``, ``CLINICAL HISTORY:``...
A header counts when it starts a line (any case) or is written in capitals anywhere (Open-I and some
exports run all sections together on one line). Text before the first header, and headers that
carry no section of ours (TECHNIQUE, EXAMINATION, NOTIFICATION...) stay in ``full`` only. A report
without any header is all findings.

Whitespace is normalised to single spaces; anonymisation placeholders are kept as one canonical
token each (``XXXX`` for Open-I's X-runs, ``___`` for MIMIC's underscore-runs) so tokenizers and the
clinical labeler see one stable token instead of a run of variable length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SECTION_NAMES = ("findings", "impression", "indication", "comparison", "history")

# header spelling -> section (None: a known header whose text belongs to no section of ours).
_HEADERS: dict[str, str | None] = {
    "findings": "findings",
    "finding": "findings",
    "findings and impression": "findings",
    "findings/impression": "findings",
    "report": "findings",
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "summary": "impression",
    "opinion": "impression",
    "indication": "indication",
    "indications": "indication",
    "clinical indication": "indication",
    "reason for exam": "indication",
    "reason for examination": "indication",
    "reason for study": "indication",
    "reason for the exam": "indication",
    "history": "history",
    "clinical history": "history",
    "clinical information": "history",
    "clinical data": "history",
    "clinical notes": "history",
    "comparison": "comparison",
    "comparisons": "comparison",
    "comparison studies": "comparison",
    "prior studies": "comparison",
    "technique": None,
    "examination": None,
    "exam": None,
    "procedure": None,
    "notification": None,
    "recommendation": None,
    "recommendations": None,
    "recommendation(s)": None,
    "wet read": None,
    "addendum": None,
    "final report": None,
}

_ALTS = "|".join(
    re.escape(h).replace(r"\ ", r"\s+") for h in sorted(_HEADERS, key=len, reverse=True)
)
_HEADER_RE = re.compile(rf"(?<![A-Za-z])({_ALTS})\s*:", re.IGNORECASE)
_FINAL_REPORT_RE = re.compile(r"^\s*FINAL\s+REPORT\b", re.IGNORECASE)
_X_RUN = re.compile(r"X{3,}")
_UNDERSCORE_RUN = re.compile(r"_{2,}")
_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Collapse whitespace and make every anonymisation placeholder one canonical token."""
    text = _X_RUN.sub("XXXX", text)
    text = _UNDERSCORE_RUN.sub("___", text)
    return _WS.sub(" ", text).strip()


@dataclass
class ReportSections:
    """One report, split into the sections the pipeline uses; ``full`` is the whole normalised text."""

    findings: str = ""
    impression: str = ""
    indication: str = ""
    comparison: str = ""
    history: str = ""
    full: str = ""

    @property
    def is_empty(self) -> bool:
        """No findings and no impression: nothing to learn from (indication alone is a request)."""
        return not (self.findings or self.impression)

    @property
    def findings_impression(self) -> str:
        """What the report says about the image: the one clinical text (``llmclip.data.text``)."""
        from llmclip.data.text import clinical_text

        return clinical_text(self)

    def to_dict(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in (*SECTION_NAMES, "full")}

    @classmethod
    def from_parts(cls, **parts: str | None) -> ReportSections:
        """Build from already separated sections (Open-I XML, CheXpert Plus columns).

        ``full`` is the sections joined with their headers, so ``parse_report(full)`` gives them back.
        """
        unknown = set(parts) - set(SECTION_NAMES)
        if unknown:
            raise ValueError(f"unknown report sections: {sorted(unknown)}")
        clean = {k: normalize_text(v or "") for k, v in parts.items()}
        order = ("indication", "history", "comparison", "findings", "impression")
        full = " ".join(f"{k.upper()}: {clean[k]}" for k in order if clean.get(k))
        return cls(**clean, full=full)


def _is_header(text: str, m: re.Match) -> bool:
    # Upper-case headers count anywhere; mixed-case ones only at the start of a line, so that
    # "no history of trauma: ..." inside a sentence is not taken for a section.
    if m.group(1).isupper():
        return True
    line_start = text.rfind("\n", 0, m.start()) + 1
    return text[line_start : m.start()].strip() == ""


def parse_report(text: str) -> ReportSections:
    """Split free text into FINDINGS / IMPRESSION / INDICATION / COMPARISON / HISTORY."""
    if not isinstance(text, str):
        raise TypeError(f"report must be str, got {type(text).__name__}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    heads = [m for m in _HEADER_RE.finditer(text) if _is_header(text, m)]
    full = normalize_text(_FINAL_REPORT_RE.sub("", text))
    if not heads:
        return ReportSections(findings=full, full=full)
    parts: dict[str, list[str]] = {name: [] for name in SECTION_NAMES}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        section = _HEADERS[_WS.sub(" ", m.group(1).lower())]
        body = normalize_text(text[m.end() : end])
        if section and body:
            parts[section].append(body)
    return ReportSections(**{k: " ".join(v) for k, v in parts.items()}, full=full)
