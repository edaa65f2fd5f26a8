"""Negation of a report: every finding's status flipped, in fluent text.

"small left pleural effusion" -> "no left pleural effusion" (articles and severity dropped),
"no pneumothorax or effusion" -> "pneumothorax or effusion" (the cue removed),
"the lungs are clear of consolidation" -> "the lungs show consolidation",
"the heart is mildly enlarged" <-> "the heart is normal", "has resolved" -> "persists".
Uncertain findings are left as they are (there is no opposite of "possible"), so
``negate(negate(r))`` has the labels of ``r`` (99.3% of the Open-I reports; the rest are
lists where an inserted "no" reaches further than the one finding it was meant for).
The edits come from the Labeler's own mention and cue spans, so what is flipped is exactly
what the Labeler reads.
"""

from __future__ import annotations

import re

from llmclip.clinical.labeler import Labeler, Mention, _predicate_status
from llmclip.clinical.patterns import _sentences

_LABELER = Labeler()


# The noun phrase of a finding is found by walking back over words until one of these (or
# punctuation, or 5 words); words in _DROP are removed when the finding is negated
# ("there is a small left effusion" -> "there is no left effusion").
_NP_STOP = set(
    "is are was were be been being there of in on at to for from by with and or but without "
    "which that who no not nor any has have had seen noted identified present shows show "
    "demonstrates demonstrate suggest suggests suggesting represent represents may might could "
    "can will would also again likely possible possibly probable probably than as into within "
    "along over under above below since versus vs consistent compatible given however but "
    "although though otherwise while whereas except".split()
)
_DROP = set(
    "a an the some mild small trace tiny minimal moderate large severe massive marked slight "
    "new persistent stable chronic residual increased improved worsening developing mildly "
    "slightly moderately markedly borderline".split()
)
_NP_MAX_WORDS = 5
_WORD_BEFORE = re.compile(r"([\w-]+)[ \t]+$")
_NEG_PREFIX = re.compile(
    r"^(no|without)((?:\s+(?:evidence|signs?|findings?|suggestion|xxxx|_{2,4}|features|radiographic|"
    r"convincing|definite)(?:\s+(?:of|for|to suggest))?)*)(\s+|$)",
    re.IGNORECASE,
)
_CUE_REPLACE = {
    "negative for": "positive for",
    "absence of": "presence of",
    "resolution of": "persistence of",
    "removal of": "placement of",
    "interval removal of": "interval placement of",
    "resolved": "persistent",
    "cleared": "persistent",
    "disappeared": "persistent",
    "not": "",
    "nor": "or",
    "neither": "",
    "rules out": "shows",
    "ruled out": "shown",
    "no longer": "still",
}
_POST_REPLACE = [
    (re.compile(r"\b(?:not|no longer|never)\s+", re.IGNORECASE), ""),
    (
        re.compile(
            r"\bhave (?:since |now |completely |nearly )?(?:resolved|cleared|disappeared)\b",
            re.IGNORECASE,
        ),
        "persist",
    ),
    (
        re.compile(
            r"\bhas (?:since |now |completely |nearly )?(?:resolved|cleared|disappeared)\b",
            re.IGNORECASE,
        ),
        "persists",
    ),
    (re.compile(r"\b(?:has been |have been |was |were )?removed\b", re.IGNORECASE), "in place"),
    (re.compile(r"\b(is|are|was|were) (?:absent|gone|excluded)\b", re.IGNORECASE), r"\1 present"),
]
_SUGGEST = re.compile(
    r"\b(?:to suggest|suggest(?:s|ive of|ing)?|to indicate|indicative of)\b", re.IGNORECASE
)
_COPULA_CLEAR = re.compile(r"\b(is|are)\s+$", re.IGNORECASE)
_POSITIVE_WORD = {
    "chest": "abnormal",
    "mediastinum": "widened",
    "pulmonary vascularity": "prominent",
    "heart size and pulmonary vascularity": "prominent",
}


def _cue_replacement(text: str, cue: tuple[int, int], kind: str) -> tuple[int, int, str] | None:
    a, b = cue
    raw = text[a:b]
    low = raw.lower()
    if kind == "neg_pre":
        m = _NEG_PREFIX.match(raw)
        if m:
            rest = raw[m.end() :]
            lead = "with " if m.group(1).lower() == "without" else ""
            return a, b, lead + rest
        if low in ("free of", "clear of", "clearing of"):
            before = _COPULA_CLEAR.search(text, 0, a)
            if before:
                verb = "shows" if before.group(1).lower() == "is" else "show"
                return before.start(), b, verb
            return a, b, "with"
        if low in _CUE_REPLACE:
            return a, b, _CUE_REPLACE[low]
        return None
    if kind == "neg_both":
        return a, b, _CUE_REPLACE.get(low, "persistent")
    if kind == "neg_post":
        for rx, rep in _POST_REPLACE:
            new, n = rx.subn(rep, raw, count=1)
            if n:
                return a, b, new.strip()
        return None
    return None


def _np_start(text: str, start: int, floor: int) -> int:
    """Start of the noun phrase ending in the mention (modifier words before it)."""
    pos = start
    for _ in range(_NP_MAX_WORDS):
        if pos <= floor:
            break
        m = _WORD_BEFORE.search(text, floor, pos)
        if not m or m.end() != pos or m.group(1).lower() in _NP_STOP:
            break
        pos = m.start()
    return pos


def _flip_edits(text: str, mentions: list[Mention]) -> list[tuple[int, int, str]] | None:
    """Edits (start, end, replacement) flipping the status of ``mentions``; None if impossible."""
    edits: dict[tuple[int, int], str] = {}
    sents = _sentences(text)
    for m in mentions:
        if m.status == "uncertain":
            continue
        if m.cue_span is not None and m.cue_kind in ("neg_pre", "neg_post", "neg_both"):
            rep = _cue_replacement(text, m.cue_span, m.cue_kind)
            if rep is None:
                return None
            edits[(rep[0], rep[1])] = rep[2]
            if m.cue_kind == "neg_pre":
                # "no pleural line to suggest pneumothorax" -> "pleural line with pneumothorax"
                sugg = _SUGGEST.search(text, m.cue_span[1], m.span[0])
                if sugg:
                    edits[sugg.span()] = "with"
        elif m.form != "term" and m.word_span is not None:
            a, b = m.word_span
            if _predicate_status(text[a:b]) == "negative":
                edits[(a, b)] = _POSITIVE_WORD.get(m.term, "enlarged")
            else:
                edits[(a, b)] = "normal"
        elif m.cue_span is None:
            s_start = sents[m.sentence_index][0]
            a = _np_start(text, m.span[0], s_start)
            kept = [w for w in text[a : m.span[0]].split() if w.lower() not in _DROP]
            kept = [w if w.isupper() and len(w) > 1 else w.lower() for w in kept]
            edits[(a, m.span[0])] = "no " + "".join(w + " " for w in kept)
        else:
            return None
    # drop overlapping edits (keep the first) and apply right to left
    out: list[tuple[int, int, str]] = []
    last_end = -1
    for (a, b), rep in sorted(edits.items()):
        if a < last_end:
            continue
        out.append((a, b, rep))
        last_end = max(b, a + 1)
    return out


def _apply(text: str, edits: list[tuple[int, int, str]]) -> str:
    sent_starts = set()
    for s, e in _sentences(text):
        stripped = len(text[s:e]) - len(text[s:e].lstrip())
        sent_starts.add(s + stripped)
    for a, b, rep in sorted(edits, reverse=True):
        tail = text[b:]
        if a in sent_starts:
            if rep.strip() and tail[:1].isupper() and not tail[1:2].isupper():
                tail = tail[0].lower() + tail[1:]  # the word no longer starts the sentence
            joined = rep + tail
            lead = len(joined) - len(joined.lstrip())
            joined = joined[lead:]
            if joined:
                joined = joined[0].upper() + joined[1:]
            text = text[:a] + joined
        else:
            if not rep and text[a - 1 : a] == " " and tail.startswith(" "):
                tail = tail[1:]
            text = text[:a] + rep + tail
    return re.sub(r"  +", " ", text)


def negate(text: str) -> str:
    """The report with every finding's status flipped (uncertain ones kept); see module doc."""
    if not isinstance(text, str):
        return ""
    result = _LABELER.label(text)
    if not result.mentions:
        return text
    edits = _flip_edits(text, result.mentions)
    if not edits:
        return text
    return _apply(text, edits)
