"""Labeler accuracy against the people-assigned Open-I MeSH labels (mapped to CheXpert).

A report counts as predicted positive for a class when the labeler's vector says 1 (positive)
or -1 (uncertain): MeSH indexers index what the report raises ("possible pneumonia" is indexed
as Pneumonia), so uncertain mentions are compared as positives (the "U-ones" policy).
Macro-F1 is taken over the classes with at least ``min_support`` positive reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmclip.clinical.labeler import Labeler
from llmclip.clinical.lexicon import CHEXPERT_CLASSES
from llmclip.labels.openi import OpenIReport, mesh_to_chexpert


@dataclass(frozen=True)
class ClassScore:
    """Precision / recall / F1 of one class."""

    name: str
    """CheXpert class."""
    support: int
    """Reports the people labelled positive."""
    predicted: int
    """Reports the labeler called positive (or uncertain)."""
    tp: int
    """Reports both call positive."""

    @property
    def precision(self) -> float:
        return self.tp / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.tp / self.support if self.support else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass(frozen=True)
class Evaluation:
    """Per-class scores and the macro-F1 over well-supported classes."""

    scores: list[ClassScore]
    """One entry per CheXpert class, in CheXpert order."""
    n_reports: int
    """Reports evaluated (indexed, with findings or impression text)."""
    min_support: int
    """Classes with fewer positives are reported but not averaged."""

    @property
    def included(self) -> list[ClassScore]:
        return [s for s in self.scores if s.support >= self.min_support]

    @property
    def macro_f1(self) -> float:
        inc = self.included
        return sum(s.f1 for s in inc) / len(inc) if inc else 0.0

    def table(self) -> str:
        """Plain-text table (the output of ``llmclip labels eval --openi``)."""
        lines = [
            f"Open-I reports evaluated: {self.n_reports} (text = findings + impression; "
            f"truth = people-assigned MeSH major terms mapped to CheXpert)",
            f"{'class':28s} {'support':>7s} {'pred':>6s} {'P':>6s} {'R':>6s} {'F1':>6s}",
        ]
        for s in self.scores:
            mark = "" if s.support >= self.min_support else f"  (support < {self.min_support})"
            lines.append(
                f"{s.name:28s} {s.support:7d} {s.predicted:6d} {s.precision:6.3f} "
                f"{s.recall:6.3f} {s.f1:6.3f}{mark}"
            )
        inc = self.included
        worst = min(inc, key=lambda s: s.f1) if inc else None
        lines.append(
            f"macro-F1 over {len(inc)} classes with >= {self.min_support} positives: "
            f"{self.macro_f1:.3f}" + (f"; lowest {worst.name} {worst.f1:.3f}" if worst else "")
        )
        return "\n".join(lines)


def evaluate_openi(
    reports: list[OpenIReport], labeler: Labeler | None = None, min_support: int = 40
) -> Evaluation:
    """Score the labeler on every indexed Open-I report that has findings or impression text."""
    labeler = labeler or Labeler()
    support = dict.fromkeys(CHEXPERT_CLASSES, 0)
    predicted = dict.fromkeys(CHEXPERT_CLASSES, 0)
    tp = dict.fromkeys(CHEXPERT_CLASSES, 0)
    n = 0
    for r in reports:
        truth = mesh_to_chexpert(r.mesh)
        if truth is None or not r.text.strip():
            continue
        n += 1
        vector = labeler.label(r.text).vector
        for c in CHEXPERT_CLASSES:
            t = truth.get(c) == 1
            p = vector.get(c) == 1
            support[c] += t
            predicted[c] += p
            tp[c] += t and p
    scores = [ClassScore(c, support[c], predicted[c], tp[c]) for c in CHEXPERT_CLASSES]
    return Evaluation(scores=scores, n_reports=n, min_support=min_support)
