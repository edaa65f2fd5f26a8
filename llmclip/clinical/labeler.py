"""Rule-based CheXpert labeler: 14 observations, positive / negative / uncertain, per mention.

How a report is read (three regex passes over the whole text, compiled in ``patterns.py``, then
cheap per-mention logic here):

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
from llmclip.clinical.fastre import lower_same_length
from llmclip.clinical.lexicon import CHEXPERT_CLASSES
from llmclip.clinical.patterns import (
    _GROUPS,
    CUES,
    MENTIONS,
    PUNCT_CUE_RE,
    _attribute_words,
    _sentences,
)

STATUS_VALUE = {"positive": 1, "uncertain": -1, "negative": 0}
PATHOLOGIES = tuple(c for c in CHEXPERT_CLASSES if c not in ("No Finding", "Support Devices"))
_CLASS_INDEX = {c: i for i, c in enumerate(CHEXPERT_CLASSES)}


@dataclass(slots=True)
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
_SEV_BEFORE = 30  # severity words sit right before the finding ("small left effusion")
_MEAS_BEFORE = 40
_INVERT = {"positive": "negative", "negative": "positive", "uncertain": "uncertain"}


_NOT_PROSE_RE = re.compile(r"[^a-z\s.,;:()/%'\"\-+]")
_MAX_SENTENCE = 2000  # a "sentence" this long without an end mark is not report prose
_MAX_NOT_PROSE = 0.15  # tolerated share of digits and odd symbols in a sentence


def _is_prose(low: str, start: int, end: int) -> bool:
    """Is this sentence written text (not noise, binary, a table dump)? Gate for unseen input."""
    n = end - start
    if n > _MAX_SENTENCE:
        return False
    bad = len(_NOT_PROSE_RE.findall(low, start, end))
    return bad <= _MAX_NOT_PROSE * n


def _predicate_status(word: str) -> str:
    # "borderline heart size" / "upper limits of normal" is reported as present and mild, as the
    # Open-I annotators index it (Cardiomegaly/borderline).
    if _BORDERLINE_RE.search(word):
        return "positive"
    if _NORMAL_WORD_RE.search(word) and not _ABNORMAL_RE.search(word):
        return "negative"
    return "positive"


class TextContext:
    """Sentences and cues of one text, to decide the status of any span (used by the graph)."""

    def __init__(self, text: str, low: str | None = None):
        self.text = text
        self.low = lower_same_length(text) if low is None else low
        self.sents = _sentences(text)
        self.sent_starts = [s for s, _ in self.sents]
        cues = [(m.start(), m.end(), m.lastgroup.split("__")[0]) for m in CUES.finditer(self.low)]
        punct = [(m.start(), m.end(), m.lastgroup) for m in PUNCT_CUE_RE.finditer(self.low)]
        self.cues = sorted(cues + punct) if punct else cues
        self.cue_starts = [c[0] for c in self.cues]

    def sentence_index(self, pos: int) -> int:
        """Index of the sentence holding character ``pos``."""
        return max(0, bisect_right(self.sent_starts, pos) - 1)

    def status(self, start: int, end: int) -> str:
        """ "positive", "negative" or "uncertain" for a finding phrase at [start, end)."""
        s_start, s_end = self.sents[self.sentence_index(start)]
        return Labeler._status(self.cues, self.cue_starts, start, end, s_start, s_end)[0]


class Labeler:
    """Rule-based CheXpert labeler. Stateless and thread-safe; construct once, call ``label``."""

    classes = CHEXPERT_CLASSES

    def label(self, text: str) -> LabelResult:
        """Label one report (any sections; feed findings + impression for CheXpert-style labels)."""
        if not isinstance(text, str) or not text.strip():
            return LabelResult()
        low = lower_same_length(text)
        found = MENTIONS.finditer(low)
        if not found:
            return LabelResult()
        ctx = TextContext(text, low)
        sents, sent_starts, cues, cue_starts = ctx.sents, ctx.sent_starts, ctx.cues, ctx.cue_starts
        attrs = _attribute_words(low)
        attr_starts = [a[0] for a in attrs]
        mentions: list[Mention] = []
        readable: dict[int, bool] = {}
        for m in found:
            name = m.lastgroup
            obs, term, form = _GROUPS[name]
            start, end = m.span()
            si = bisect_right(sent_starts, start) - 1
            s_start, s_end = sents[si]
            if si not in readable:
                readable[si] = _is_prose(low, s_start, s_end)
            if not readable[si]:
                continue
            word_span = m.span(name + "w") if form != "term" else None
            status, cue = self._status(cues, cue_starts, start, end, s_start, s_end)
            if form != "term":
                word = m.group(name + "w")
                own = _predicate_status(word)
                if own == "negative" or own == "uncertain" or status == "positive":
                    status, cue = own, None
            laterality, severity, measure = self._attributes(
                attrs, attr_starts, start, end, s_start, s_end
            )
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
        if not mentions:
            return LabelResult()
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
    def _attributes(attrs, attr_starts, start, end, s_start, s_end):
        """Laterality, severity and size near a mention, from the report's attribute words."""
        lo, hi = max(s_start, start - _ATTR_BEFORE), min(s_end, end + _ATTR_AFTER)
        laterality = severity = measure = None
        best_lat = best_sev = best_meas = 1 << 30
        for k in range(bisect_left(attr_starts, lo), bisect_left(attr_starts, hi)):
            a_start, a_end, kind, value = attrs[k]
            if a_end > hi:
                break
            # distance to the mention; words before it (English modifiers) are preferred
            if a_end <= start:
                d = start - a_end
            elif a_start >= end:
                d = (a_start - end) * 2 + 1
            else:
                d = 0
            if kind == "lat":
                if d < best_lat:
                    best_lat, laterality = d, value
            elif kind == "sev":
                if a_start >= start - _SEV_BEFORE and a_start < end and d < best_sev:
                    best_sev, severity = d, value
            elif a_start >= start - _MEAS_BEFORE and d < best_meas:
                best_meas, measure = d, value
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
