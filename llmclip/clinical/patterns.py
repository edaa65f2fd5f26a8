"""The labeler's regex passes, compiled once at import from the lexicon's phrases.

Each pass runs once over a whole (lower-cased) report; ``labeler.py`` then decides status and
attributes per mention from what they found:

- sentences: ``.``/``!``/``?`` followed by white space, and line breaks (``_sentences``);
- mentions: one alternation of every observation phrase (``MENTIONS``; ``_GROUPS`` names the
  observation, term and form of each alternative);
- cues: pseudo-negations, uncertainty and negation cues, scope terminators (``CUES``, and
  ``PUNCT_CUE_RE`` for the cues made of punctuation);
- attribute words: laterality, severity, sizes (``_attribute_words``).
"""

from __future__ import annotations

import re

from llmclip.clinical import lexicon as lx
from llmclip.clinical.fastre import WordStartMatcher
from llmclip.clinical.lexicon import LATERALITY, SEVERITY


def _wrap(fragment: str) -> str:
    """Word boundaries around a fragment, only on sides that are word characters."""
    left = r"\b" if re.match(r"[\w(]", fragment) else ""
    return f"{left}(?:{fragment})(?!\\w)"


def _mention_alternatives() -> tuple[
    list[tuple[str, str]], dict[str, tuple[tuple[str, ...], str, str]]
]:
    alts: list[tuple[str, str]] = []
    groups: dict[str, tuple[tuple[str, ...], str, str]] = {}
    pred = f"(?:{lx.PREDICATE_BORDERLINE}|{lx.PREDICATE_NORMAL}|{lx.PREDICATE_POSITIVE})"
    for i, (obs, term, subject) in enumerate(lx.PREDICATE_SUBJECTS):
        name = f"p{i}"
        alts.append(
            (
                name,
                f"(?:{subject}){lx.PREDICATE_GAP}\\s+(?P<{name}w>{lx.PREDICATE_ADVERBS}(?:{pred})(?!\\w))",
            )
        )
        groups[name] = (obs, term, "predicate")
    for i, (obs, term, subject) in enumerate(lx.PREFIX_SUBJECTS):
        name = f"x{i}"
        alts.append((name, f"(?P<{name}w>(?:{lx.PREFIX_WORDS}))\\s+(?:{subject})(?!\\w)"))
        groups[name] = (obs, term, "prefix")
    for i, (obs, term, rx) in enumerate(lx.TERMS):
        name = f"t{i}"
        alts.append((name, f"(?:{rx})(?!\\w)"))
        groups[name] = (obs, term, "term")
    return [(n, _placeholders(rx)) for n, rx in alts], groups


def _placeholders(rx: str) -> str:
    """Open-I's ``XXXX`` and MIMIC's ``___`` anonymisation placeholders are the same token."""
    return rx.replace("xxxx", "(?:xxxx|_{2,4})")


_MENTION_ALTS, _GROUPS = _mention_alternatives()
MENTIONS = WordStartMatcher(_MENTION_ALTS)
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
_WORD_FRAG = re.compile(r"[\w(]")
CUES = WordStartMatcher(
    [
        (f"{kind}__{i}", _placeholders(f"(?:{f})(?!\\w)"))
        for kind, frags in _CUE_ORDER
        for i, f in enumerate(frags)
        if _WORD_FRAG.match(f)
    ]
)
# Cues made of punctuation ("?", ";") are not at word starts: found by a separate small regex.
PUNCT_CUE_RE = re.compile(
    "|".join(
        f"(?P<{kind}>{'|'.join(f for f in frags if not _WORD_FRAG.match(f))})"
        for kind, frags in _CUE_ORDER
        if any(not _WORD_FRAG.match(f) for f in frags)
    )
)
SENTENCE_END_RE = re.compile(r"[.!?]+(?=\s|$)|\n")
# Attribute words of a whole report in one pass (on lower-cased text).
ATTR_RE = re.compile(
    r"\b(?:(?P<lat>" + "|".join(LATERALITY) + r")|(?P<sev>" + "|".join(SEVERITY) + r")|"
    r"(?P<num>\d+(?:\.\d+)?)\s*(?:x\s*\d+(?:\.\d+)?\s*)?(?P<unit>cm|mm|centimeters?|"
    r"millimeters?))\b"
)


def _attribute_words(low: str) -> list[tuple[int, int, str, str]]:
    out = []
    for m in ATTR_RE.finditer(low):
        kind = m.lastgroup
        if kind == "lat":
            out.append((m.start(), m.end(), "lat", LATERALITY[m.group()]))
        elif kind == "sev":
            out.append((m.start(), m.end(), "sev", SEVERITY[m.group()]))
        else:
            unit = "cm" if m.group("unit").startswith("c") else "mm"
            out.append((m.start(), m.end(), "meas", f"{m.group('num')} {unit}"))
    return out


def _sentences(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in SENTENCE_END_RE.finditer(text):
        if m.end() > start:
            spans.append((start, m.end()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans
