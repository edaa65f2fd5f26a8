"""Clinically equivalent rewrites of a report: the same facts in other words or another layout.

``equivalent_rewrites``: abbreviate, expand (each short form kept only where the Labeler reads
the same facts), telegraphic style, dashed lines, lower or upper case, sentence shuffle, synonym
swap, impression-only, findings-only. A rewrite is kept only if the Labeler gives it the same
14-class vector as the original.
"""

from __future__ import annotations

import re

from llmclip.clinical import lexicon as lx
from llmclip.clinical.facts import summarise
from llmclip.clinical.labeler import Labeler
from llmclip.clinical.patterns import _sentences
from llmclip.clinical.variants import Variant, _choice, _randint, _shuffled

_LABELER = Labeler()

_ABBREV_TO_LONG = [
    (re.compile(rf"(?<![\w/]){re.escape(a)}(?![\w/])"), b) for a, b in lx.ABBREVIATIONS
]
_LONG_TO_ABBREV = [
    (re.compile(rf"\b{re.escape(b)}\b", re.IGNORECASE), a)
    for a, b in lx.ABBREVIATIONS
    if len(b) > 4
]
_TELEGRAPHIC = [
    (re.compile(r"\b(?:there|there's)\s+(?:is|are|has been|have been)\s+", re.IGNORECASE), ""),
    (re.compile(r"\b(?:the|a|an)\s+", re.IGNORECASE), ""),
    (
        re.compile(
            r"\s+(?:is|are)\s+(?=(?:noted|seen|present|identified|again seen)\b)", re.IGNORECASE
        ),
        " ",
    ),
]
_SECTION = re.compile(r"\b(FINDINGS|IMPRESSION|CONCLUSION)\s*:\s*", re.IGNORECASE)


def _sections(text: str) -> dict[str, str]:
    heads = list(_SECTION.finditer(text))
    out = {}
    for i, h in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        name = "impression" if h.group(1).lower() in ("impression", "conclusion") else "findings"
        out[name] = text[h.end() : end].strip()
    return out


def _replace_outside(text: str, src: str, dst: str) -> str:
    """Replace ``src`` by ``dst`` except where ``src`` is already part of a ``dst`` phrase."""
    inside = [m.span() for m in re.finditer(rf"\b{re.escape(dst)}\b", text, re.IGNORECASE)]
    out, last = [], 0
    for m in re.finditer(rf"\b{re.escape(src)}\b", text, re.IGNORECASE):
        if any(a <= m.start() and m.end() <= b for a, b in inside):
            continue
        out.append(text[last : m.start()] + dst)
        last = m.end()
    return "".join(out) + text[last:]


def _capitalise_sentences(text: str) -> str:
    return re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def _lexicon_rewrite(text: str, table: list, rng) -> tuple[str, list[str]]:
    """Apply a random ~3/4 of the lexicon entries that occur, each kept only where the Labeler
    sees the same facts (one unknown short form must not cost the whole rewrite)."""
    ref = summarise(_LABELER.label(text))
    new, hits = text, []
    for rx, repl in table:
        if not rx.search(new) or _randint(rng, 4) == 0:
            continue
        cand = rx.sub(repl, new)
        if summarise(_LABELER.label(cand)) == ref:
            new = cand
            hits.append(repl)
    return new, hits


def _styles(text: str, rng) -> list[Variant]:
    """Layouts real reports come in: one finding per dashed line; all lower case or all capitals."""
    sents = [text[a:b].strip() for a, b in _sentences(text) if text[a:b].strip()]
    out = []
    if len(sents) >= 2:
        out.append(Variant("\n".join(f"- {s}" for s in sents), "bullets", "one dashed line per sentence"))
    if _randint(rng, 2):
        out.append(Variant(text.lower(), "lowercase", "lower case"))
    else:
        out.append(Variant(text.upper(), "uppercase", "capitals"))
    return [v for v in out if v.text != text]


def _candidates(text: str, rng) -> list[Variant]:
    out = []
    new, hits = _lexicon_rewrite(text, _ABBREV_TO_LONG, rng)
    if hits:
        out.append(Variant(new, "expand", "expanded: " + ", ".join(hits)))
    new, hits = _lexicon_rewrite(text, _LONG_TO_ABBREV, rng)
    if hits:
        out.append(Variant(new, "abbreviate", "abbreviated: " + ", ".join(hits)))
    out += _styles(text, rng)
    new = text
    for rx, rep in _TELEGRAPHIC:
        new = rx.sub(rep, new)
    new = _capitalise_sentences(new)
    if new != text:
        out.append(Variant(new, "telegraphic", "dropped articles and copulas"))
    sents = [text[a:b].strip() for a, b in _sentences(text) if text[a:b].strip()]
    sents = [x if x.endswith((".", "!", "?")) else x + "." for x in sents]
    if len(sents) >= 2:
        order = _shuffled(rng, list(range(len(sents))))
        if order != sorted(order):
            out.append(Variant(" ".join(sents[i] for i in order), "shuffle", f"order {order}"))
    pairs = []
    for a, b in lx.SYNONYMS:
        for src, dst in ((a, b), (b, a)):
            if re.search(rf"\b{re.escape(src)}\b", text, re.IGNORECASE):
                pairs.append((src, dst))
    if pairs:
        src, dst = _choice(rng, pairs)
        new = _replace_outside(text, src, dst)
        out.append(Variant(_capitalise_sentences(new), "synonym", f"{src} -> {dst}"))
    secs = _sections(text)
    if secs.get("impression") and secs.get("findings"):
        out.append(Variant(secs["impression"], "impression_only", "impression section only"))
        out.append(Variant(secs["findings"], "findings_only", "findings section only"))
    return out


def equivalent_rewrites(text: str, rng, verify: bool = True) -> list[Variant]:
    """Clinically equivalent versions of ``text`` (label vector unchanged when ``verify``)."""
    if not isinstance(text, str) or not text.strip():
        return []
    cands = _candidates(text, rng)
    if not verify:
        return cands
    ref = _LABELER.label(text).vector
    return [v for v in cands if v.text != text and _LABELER.label(v.text).vector == ref]
