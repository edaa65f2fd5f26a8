"""The one clinical text of a report, read by every stage.

Labels (the soft labels' c term), report graphs (g term and GCN input), stage-1 pairs, the embedding
cache (the CLIP pair and the t term), negation and every evaluation read the same string: the
FINDINGS then the IMPRESSION of a report, single-spaced, without section headers; the impression
alone when there are no findings (and the findings alone without an impression). INDICATION,
COMPARISON and HISTORY never enter it: they describe why the film was taken, not what it shows, so
an indication of "nasal congestion" must not become an Edema label, node or negation.

``TEXT_SPEC`` names this definition. The cache records it in its meta and stage 2 refuses a cache
built from another text, so a change here forces a rebuild instead of a silent mismatch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

TEXT_SPEC = "findings+impression/v1"
"""Name of the report-text definition (recorded in the cache meta, checked by stage 2)."""

_WS = re.compile(r"\s+")


def clinical_text(report: Any) -> str:
    """Findings + impression of a report (a ``ReportSections`` or a shard's ``report`` dict)."""
    if isinstance(report, Mapping):
        parts = [report.get("findings"), report.get("impression")]
    else:
        parts = [getattr(report, "findings", None), getattr(report, "impression", None)]
    clean = [_WS.sub(" ", p).strip() for p in parts if isinstance(p, str)]
    return " ".join(p for p in clean if p)


def sample_text(meta: Mapping[str, Any]) -> str:
    """The clinical text of a shard sample's json (empty when the sample has no report)."""
    report = meta.get("report") if isinstance(meta, Mapping) else None
    return clinical_text(report) if isinstance(report, Mapping) else ""
