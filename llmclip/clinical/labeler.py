"""Rule-based CheXpert labeler: 14 observations, positive / negative / uncertain, per mention.

How a report is read (three regex passes over the whole text, then cheap per-mention logic):

1. sentences: split at ``.``/``!``/``?`` followed by white space, and at line breaks;
2. mentions: one compiled alternation of every observation phrase in ``lexicon.py`` (subject +
   predicate forms such as "the heart is mildly enlarged" first, then prefixed forms such as
   "normal heart size", then plain terms such as "small left pleural effusion");
3. cues: one compiled alternation of pseudo-negations ("no change"), uncertainty cues ("may
   represent", "cannot be excluded", "versus"), negation cues ("no", "without", "free of",
   "has resolved", "is not seen") and scope terminators ("but", "which", "there is", ";").

A mention's status comes from the nearest cue before it in the same clause (no terminator in
between), overridden by a cue right after it ("... cannot be excluded", "... has resolved").
Predicate forms carry their own status (normal -> negative; enlarged or borderline -> positive).

Aggregation (CheXpert): per observation, positive if any mention is positive, else uncertain if
any is uncertain, else negative. No Finding is 1 when the report has at least one mention and no
pathology (everything but Support Devices) is positive or uncertain; 0 when one is (CheXpert
leaves it blank there; 0 is more useful for soft labels and is documented as our choice).
Text without any mention (empty, non-English, noise) gives an empty result.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

import numpy as np

from llmclip.clinical import lexicon as lx
from llmclip.clinical.lexicon import CHEXPERT_CLASSES, LATERALITY, SEVERITY

STATUS_VALUE = {"positive": 1, "uncertain": -1, "negative": 0}
PATHOLOGIES = tuple(c for c in CHEXPERT_CLASSES if c not in ("No Finding", "Support Devices"))
_CLASS_INDEX = {c: i for i, c in enumerate(CHEXPERT_CLASSES)}


@dataclass(frozen=True)
class Mention:
    """One observation mentioned in a report."""

    observation: str
    """CheXpert class name (one of ``CHEXPERT_CLASSES``)."""
    status: str
    """"positive", "negative" or "uncertain"."""
    sentence: str
    """The sentence the mention is in (stripped)."""
    span: tuple[int, int]
    """Character span of the mention phrase in the report text."""
    laterality: str | None = None
    """"left", "right", "bilateral" or None."""
    severity: str | None = None
    """"trace", "small", "mild", "moderate", "large", "severe" or None."""
    term: str = ""
    """Canonical lexicon term that matched ("pleural effusion", "pacemaker", ...)."""
    measurement: str | None = None
    """A size in the same clause ("1.2 cm"), normalised, or None."""
    form: str = "term"
    """How it was found: "term", "predicate" (the heart is enlarged) or "prefix" (normal heart)."""
    cue_span: tuple[int, int] | None = None
    """Span of the negation/uncertainty cue that decided the status, if any."""
    cue_kind: str | None = None
    """Kind of that cue: neg_pre, neg_post, unc_pre, unc_post, unc_both."""
    word_span: tuple[int, int] | None = None
    """Span of the predicate/prefix word (with its adverbs) for predicate and prefix forms."""
    sentence_index: int = 0
    """Index of the sentence in the report."""


@dataclass
class LabelResult:
    """Mentions found in one report and the aggregated CheXpert vector."""

    mentions: list[Mention] = field(default_factory=list)
    """Every mention, in text order."""
    vector: dict[str, int] = field(default_factory=dict)
    """Class -> 1 (positive), 0 (negative), -1 (uncertain); absent = not mentioned."""

    def as_array(self) -> np.ndarray:
        """float32 [14] in CheXpert order: 1 positive, -1 uncertain, 0 negative, nan absent."""
        out = np.full(len(CHEXPERT_CLASSES), np.nan, dtype=np.float32)
        for name, value in self.vector.items():
            out[_CLASS_INDEX[name]] = value
        return out

    def __bool__(self) -> bool:
        return bool(self.mentions)


# --------------------------------------------------------------------------------------------
# Compilation (once, at import).


def _wrap(fragment: str) -> str:
    """Word boundaries around a fragment, only on sides that are word characters."""
    left = r"\b" if re.match(r"[\w(]", fragment) else ""
    return f"{left}(?:{fragment})(?!\\w)"


def _build_mention_regex() -> tuple[re.Pattern[str], dict[str, tuple[tuple[str, ...], str, str]]]:
    parts: list[str] = []
    groups: dict[str, tuple[tuple[str, ...], str, str]] = {}
    pred = f"(?:{lx.PREDICATE_BORDERLINE}|{lx.PREDICATE_NORMAL}|{lx.PREDICATE_POSITIVE})"
    for i, (obs, term, subject) in enumerate(lx.PREDICATE_SUBJECTS):
        name = f"p{i}"
        parts.append(
            f"(?P<{name}>\\b(?:{subject}){lx.PREDICATE_GAP}\\s+"
            f"(?P<{name}w>{lx.PREDICATE_ADVERBS}(?:{pred})(?!\\w)))"
        )
        groups[name] = (obs, term, "predicate")
    for i, (obs, term, subject) in enumerate(lx.PREFIX_SUBJECTS):
        name = f"x{i}"
        parts.append(
            f"(?P<{name}>(?P<{name}w>\\b(?:{lx.PREFIX_WORDS}))\\s+(?:{subject})(?!\\w))"
        )
        groups[name] = (obs, term, "prefix")
    for i, (obs, term, rx) in enumerate(lx.TERMS):
        name = f"t{i}"
        parts.append(f"(?P<{name}>{_wrap(rx)})")
        groups[name] = (obs, term, "term")
    return re.compile("|".join(parts), re.IGNORECASE), groups


MENTION_RE, _GROUPS = _build_mention_regex()
_CUE_ORDER = [
    ("pseudo", lx.PSEUDO_CUES),
    ("unc_post", lx.UNCERTAIN_POST_CUES),
    ("unc_both", lx.UNCERTAIN_BOTH_CUES),
    ("unc_sugg", lx.SUGGEST_CUES),
    ("unc_pre", lx.UNCERTAIN_PRE_CUES),
    ("neg_post", lx.NEGATION_POST_CUES),
    ("neg_both", lx.NEGATION_BOTH_CUES),
    ("neg_pre", lx.NEGATION_PRE_CUES),
    ("term", lx.TERMINATORS),
]
CUE_RE = re.compile(
    "|".join(f"(?P<{kind}>{'|'.join(_wrap(f) for f in frags)})" for kind, frags in _CUE_ORDER),
    re.IGNORECASE,
)
SENTENCE_END_RE = re.compile(r"[.!?]+(?=\s|$)|\n")
LATERALITY_RE = re.compile(r"\b(?:" + "|".join(LATERALITY) + r")\b", re.IGNORECASE)
SEVERITY_RE = re.compile(r"\b(?:" + "|".join(SEVERITY) + r")\b", re.IGNORECASE)
MEASURE_RE = re.compile(
    r"\b(\d+(?:\.\d+)?)\s*(?:x\s*\d+(?:\.\d+)?\s*)?(cm|mm|centimeters?|millimeters?)\b", re.IGNORECASE
)
_BORDERLINE_RE = re.compile(lx.PREDICATE_BORDERLINE, re.IGNORECASE)
_NORMAL_WORD_RE = re.compile(r"\b(?:normal|unremarkable|within)", re.IGNORECASE)
_ABNORMAL_RE = re.compile(r"\babnormal\b", re.IGNORECASE)

# Statuses of a mention's own predicate word.
_PRE_KINDS = ("neg_pre", "neg_both", "unc_pre", "unc_both", "unc_sugg")
_POST_KINDS = ("neg_post", "neg_both", "unc_post", "unc_both")
_CUE_STATUS = {
    "neg_pre": "negative",
    "neg_post": "negative",
    "neg_both": "negative",
    "unc_pre": "uncertain",
    "unc_post": "uncertain",
    "unc_both": "uncertain",
    "unc_sugg": "uncertain",
}
_POST_WINDOW = 80  # chars after a mention in which a post cue ("... has resolved") may stand
_ATTR_BEFORE = 60  # chars before a mention searched for laterality / severity
_ATTR_AFTER = 40
_INVERT = {"positive": "negative", "negative": "positive", "uncertain": "uncertain"}


def _sentences(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in SENTENCE_END_RE.finditer(text):
        if m.end() > start:
            spans.append((start, m.end()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _predicate_status(word: str) -> str:
    # "borderline heart size" / "upper limits of normal" is reported as present and mild, as the
    # Open-I annotators index it (Cardiomegaly/borderline).
    if _BORDERLINE_RE.search(word):
        return "positive"
    if _NORMAL_WORD_RE.search(word) and not _ABNORMAL_RE.search(word):
        return "negative"
    return "positive"


class Labeler:
    """Rule-based CheXpert labeler. Stateless and thread-safe; construct once, call ``label``."""

    classes = CHEXPERT_CLASSES

    def label(self, text: str) -> LabelResult:
        """Label one report (any sections; feed findings + impression for CheXpert-style labels)."""
        if not isinstance(text, str) or not text.strip():
            return LabelResult()
        found = list(MENTION_RE.finditer(text))
        if not found:
            return LabelResult()
        sents = _sentences(text)
        sent_starts = [s for s, _ in sents]
        cues = [(m.start(), m.end(), m.lastgroup) for m in CUE_RE.finditer(text)]
        cue_starts = [c[0] for c in cues]
        mentions: list[Mention] = []
        for m in found:
            name = m.lastgroup
            obs, term, form = _GROUPS[name]
            start, end = m.span()
            si = bisect_right(sent_starts, start) - 1
            s_start, s_end = sents[si]
            word_span = m.span(name + "w") if form != "term" else None
            status, cue = self._status(cues, cue_starts, start, end, s_start, s_end)
            if form != "term":
                word = m.group(name + "w")
                own = _predicate_status(word)
                if own == "negative" or own == "uncertain" or status == "positive":
                    status, cue = own, None
            laterality, severity, measure = self._attributes(text, start, end, s_start, s_end)
            if form != "term" and severity is None and _BORDERLINE_RE.search(word):
                severity = "mild"
            sentence = text[s_start:s_end].strip()
            for o in obs:
                st = _INVERT[status] if o == "No Finding" else status
                mentions.append(
                    Mention(
                        observation=o,
                        status=st,
                        sentence=sentence,
                        span=(start, end),
                        laterality=laterality if o not in ("No Finding", "Cardiomegaly") else None,
                        severity=severity if o != "No Finding" else None,
                        term=term,
                        measurement=measure,
                        form=form,
                        cue_span=(cue[0], cue[1]) if cue else None,
                        cue_kind=cue[2] if cue else None,
                        word_span=word_span,
                        sentence_index=si,
                    )
                )
        return LabelResult(mentions=mentions, vector=aggregate(mentions))

    @staticmethod
    def _status(cues, cue_starts, start, end, s_start, s_end):
        """Status from the nearest governing cue: (status, cue or None)."""
        # Post cue: the first cue after the mention, in the same sentence and close by.
        j = bisect_left(cue_starts, end)
        if j < len(cues):
            c = cues[j]
            if c[0] < s_end and c[0] - end <= _POST_WINDOW and c[2] in _POST_KINDS:
                return _CUE_STATUS[c[2]], c
        # Pre cue: walk back from the mention's end to the sentence start; a terminator, a
        # pseudo-negation or another mention's post cue in between closes the scope.
        i = j - 1
        while i >= 0:
            c = cues[i]
            if c[0] < s_start:
                break
            kind = c[2]
            if kind == "unc_sugg":
                # "no focal opacity to suggest pneumonia": a negation earlier in the clause wins
                neg = Labeler._negation_before(cues, i, s_start)
                return ("negative", neg) if neg else ("uncertain", c)
            if kind in _PRE_KINDS:
                return _CUE_STATUS[kind], c
            if c[1] <= start:
                break
            i -= 1
        return "positive", None

    @staticmethod
    def _negation_before(cues, i, s_start):
        """The negation cue governing cue ``i`` (same clause), or None."""
        k = i - 1
        while k >= 0 and cues[k][0] >= s_start:
            kind = cues[k][2]
            if kind == "neg_pre":
                return cues[k]
            if kind in ("term", "pseudo", "unc_pre", "unc_both"):
                return None
            k -= 1
        return None

    @staticmethod
    def _attributes(text, start, end, s_start, s_end):
        lo, hi = max(s_start, start - _ATTR_BEFORE), min(s_end, end + _ATTR_AFTER)
        laterality = None
        best = None
        for lm in LATERALITY_RE.finditer(text, lo, hi):
            # nearest, preferring words before the mention (modifiers precede nouns in English)
            d = start - lm.end() if lm.end() <= start else (lm.start() - end) * 2 + 1
            if lm.start() >= start and lm.end() <= end:
                d = 0
            if best is None or d < best:
                best, laterality = d, LATERALITY[lm.group().lower()]
        severity = None
        best = None
        for sm in SEVERITY_RE.finditer(text, max(s_start, start - 30), end):
            d = start - sm.end() if sm.end() <= start else 0
            if best is None or d < best:
                best, severity = d, SEVERITY[sm.group().lower()]
        measure = None
        mm = MEASURE_RE.search(text, max(s_start, start - 40), hi)
        if mm:
            unit = mm.group(2).lower()
            measure = f"{mm.group(1)} {'cm' if unit.startswith('c') else 'mm'}"
        return laterality, severity, measure


def aggregate(mentions: list[Mention]) -> dict[str, int]:
    """CheXpert aggregation of mention statuses into the 14-class vector (see module doc)."""
    vector: dict[str, int] = {}
    for m in mentions:
        if m.observation == "No Finding":
            continue
        v = STATUS_VALUE[m.status]
        old = vector.get(m.observation)
        if old is None or v == 1 or (v == -1 and old == 0):
            vector[m.observation] = v
    if mentions:
        abnormal = any(vector.get(c) in (1, -1) for c in PATHOLOGIES) or any(
            m.observation == "No Finding" and m.status == "negative" for m in mentions
        )
        vector["No Finding"] = 0 if abnormal else 1
    return {c: vector[c] for c in CHEXPERT_CLASSES if c in vector}
