"""What a text encoder is asked to embed (``TextSuite``) and the encoder's shape (``Encode``):
shared by the evaluation (``eval.text``) and its baselines (``eval.baselines``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Encode = Callable[[list[str], str | None], np.ndarray]


@dataclass
class TextSuite:
    """Everything an encoder is asked to embed, built once from the held-out reports."""

    reports: list[str] = field(default_factory=list)
    error_items: list[tuple[int, str, list[str], str]] = field(default_factory=list)
    """(report index, rewrite, three edits, rewrite kind)."""
    findings: list[str] = field(default_factory=list)
    impression_of: list[int] = field(default_factory=list)
    """Index into ``impressions`` of each findings' own impression."""
    impressions: list[str] = field(default_factory=list)
    abbreviated: list[tuple[int, str]] = field(default_factory=list)
    """(report index, abbreviated rewrite)."""
    edit_kinds: list[list[str]] = field(default_factory=list)
    """Kinds of the three edits of each error item (for the per-kind breakdown)."""
    heldout_items: list[tuple[int, str, list[str], str]] = field(default_factory=list)
    """Held-out family error items: (report index, styled report, three styled edits, style)."""
    heldout_kinds: list[list[str]] = field(default_factory=list)
    heldout_abbreviated: list[tuple[int, str]] = field(default_factory=list)
    """(report index, the report in the held-out abbreviation lexicon)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Held-out edits the Labeler did not confirm, by kind (dropped, not kept)."""
