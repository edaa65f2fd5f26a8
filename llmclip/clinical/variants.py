"""Report variants for contrastive training: meaning-preserving rewrites, one-error edits, negation.

- ``equivalent_rewrites``: abbreviate, expand (each short form kept only where the Labeler reads
  the same facts), telegraphic style, dashed lines, lower or upper case, sentence shuffle, synonym
  swap, impression-only, findings-only. A rewrite is kept only if the Labeler gives it the same
  14-class vector as the original.
- ``one_error_edits``: negation flip (in place, or the finding's sentences as one template
  sentence with varied cue words), laterality swap, severity change, device added / removed,
  measurement change, finding replaced by a neighbour. An edit is kept only if the Labeler sees
  exactly that one change (``confirm_edit``); unconfirmed edits are discarded.

These are the *training* family. Evaluation uses its own generators (``llmclip.eval.heldout``),
which share no lexicon entry, template or output with these (``tests/eval/test_heldout.py``).
- ``negate`` (``negation.py``): every positive finding becomes absent and every negated one
  present, fluently ("small left pleural effusion" -> "no left pleural effusion", "no pneumothorax" ->
  "pneumothorax", "the heart is normal in size" -> "the heart is enlarged"). Uncertain findings
  are left as they are (there is no opposite of "possible"), so ``negate(negate(r))`` has the
  labels of ``r``.

``rng`` may be a ``random.Random`` or a ``numpy.random.Generator``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmclip.clinical import lexicon as lx
from llmclip.clinical.labeler import LATERALITY, SEVERITY, Labeler, LabelResult, Mention, _sentences
from llmclip.clinical.negation import _apply, _flip_edits

_LABELER = Labeler()


@dataclass(frozen=True)
class Variant:
    """A rewritten or edited report and what was done to it."""

    text: str
    """The new report text."""
    kind: str
    """What kind of change: "abbreviate", "negation_flip", ... (see module doc)."""
    detail: str
    """Human-readable description of the change (e.g. "Pleural Effusion: positive -> negative")."""


# --------------------------------------------------------------------------------------------
# Random helpers working with random.Random and numpy Generators.


def _randint(rng, n: int) -> int:
    if hasattr(rng, "integers"):
        return int(rng.integers(n))
    return rng.randrange(n)


def _shuffled(rng, items: list) -> list:
    items = list(items)
    for i in range(len(items) - 1, 0, -1):
        j = _randint(rng, i + 1)
        items[i], items[j] = items[j], items[i]
    return items


def _choice(rng, items: list):
    return items[_randint(rng, len(items))]


# --------------------------------------------------------------------------------------------
# Meaning-preserving rewrites.

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


# --------------------------------------------------------------------------------------------
# One-error edits.

Summary = dict[str, tuple[int, frozenset, frozenset, frozenset, frozenset]]


def summarise(result: LabelResult) -> Summary:
    """Per observation: (vector value, lateralities, severities, measurements, device terms)."""
    out: Summary = {}
    for obs, value in result.vector.items():
        if obs == "No Finding":
            continue
        ms = [m for m in result.mentions if m.observation == obs and m.status != "negative"]
        out[obs] = (
            value,
            frozenset(m.laterality for m in ms if m.laterality),
            frozenset(m.severity for m in ms if m.severity),
            frozenset(m.measurement for m in ms if m.measurement),
            frozenset(m.term for m in ms) if obs == "Support Devices" else frozenset(),
        )
    return out


_FIELDS = ("status", "laterality", "severity", "measurement", "device")


def diff(before: Summary, after: Summary) -> dict[str, list[str]]:
    """Observation -> fields that differ ("status" when it appeared or vanished)."""
    out: dict[str, list[str]] = {}
    for obs in set(before) | set(after):
        a, b = before.get(obs), after.get(obs)
        if a == b:
            continue
        if a is None or b is None:
            out[obs] = ["status"]
        else:
            out[obs] = [f for f, x, y in zip(_FIELDS, a, b, strict=True) if x != y]
    return out


def confirm_edit(kind: str, before: Summary, after: Summary, target: str | None = None) -> bool:
    """Does ``after`` differ from ``before`` by exactly the one fact an edit of ``kind`` changes?"""
    d = diff(before, after)
    if kind == "finding_swap":
        # one finding changes identity: the new observation appears; the old one may vanish
        return (
            target in d
            and d[target] == ["status"]
            and len(d) <= 2
            and all(f == ["status"] for f in d.values())
        )
    if len(d) != 1:
        return False
    ((obs, fields),) = d.items()
    if target is not None and obs != target:
        return False
    if kind == "negation_flip":
        return "status" in fields and before.get(obs, (None,))[0] != after.get(obs, (None,))[0]
    if kind in ("device_add", "device_remove"):
        return obs == "Support Devices" and bool(fields)
    want = {
        "laterality_swap": "laterality",
        "severity_change": "severity",
        "measurement_change": "measurement",
    }[kind]
    return fields == [want]


_SEVERITY_SWAP = {
    "trace": "large",
    "tiny": "large",
    "small": "large",
    "minimal": "extensive",
    "mild": "severe",
    "mildly": "severely",
    "slight": "marked",
    "slightly": "markedly",
    "moderate": "mild",
    "moderately": "mildly",
    "large": "small",
    "massive": "small",
    "severe": "mild",
    "severely": "mildly",
    "marked": "mild",
    "markedly": "mildly",
    "borderline": "severe",
}
_SEVERITY_WORD = re.compile(r"\b(" + "|".join(SEVERITY) + r")\b", re.IGNORECASE)
_LATERALITY_WORD = re.compile(r"\b(" + "|".join(LATERALITY) + r")\b", re.IGNORECASE)
_MEASURE = re.compile(r"\b(\d+(?:\.\d+)?)(\s*(?:x\s*\d+(?:\.\d+)?\s*)?(?:cm|mm))\b", re.IGNORECASE)


def _match_case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word


def _nearest(rx: re.Pattern[str], text: str, m: Mention, before: int, after: int):
    lo, hi = max(0, m.span[0] - before), min(len(text), m.span[1] + after)
    best = None
    for hit in rx.finditer(text, lo, hi):
        d = m.span[0] - hit.end() if hit.end() <= m.span[0] else max(0, hit.start() - m.span[1]) * 2
        if best is None or d < best[0]:
            best = (d, hit)
    return best[1] if best else None


# Sentence templates for a flipped finding (the cue words vary, as they do across radiologists).
_NEGATED_SENTENCE = ("There is no {t}.", "No evidence of {t}.", "{T} is not identified.", "No {t}.")
_AFFIRMED_SENTENCE = ("There is {t}.", "{T} is noted.", "{T} is identified.")


def template_flip(text: str, mentions: list[Mention], obs: str, rng,
                  negated: tuple[str, ...] = _NEGATED_SENTENCE,
                  affirmed: tuple[str, ...] = _AFFIRMED_SENTENCE) -> str | None:
    """The sentences of one finding (``obs``, all its ``mentions`` of the report) rewritten as one
    template sentence of the opposite status, ``{T}``/``{t}`` the finding's term; None where those
    sentences state other findings too (a template would change them), for an uncertain mention
    (no opposite) or a predicate form ("heart size is normal": no term to template). The templates
    are the caller's: training and evaluation use different cue words."""
    ms = [m for m in mentions if m.observation == obs]
    if not ms or any(m.status == "uncertain" or m.form != "term" for m in ms):
        return None
    idx = {m.sentence_index for m in ms}
    if idx & {m.sentence_index for m in mentions if m.observation != obs}:
        return None
    term = ms[0].term
    tpl = _choice(rng, list(negated if ms[0].status == "positive" else affirmed))
    new = tpl.format(T=term[:1].upper() + term[1:], t=term)
    parts = []
    for i, (a, b) in enumerate(_sentences(text)):
        sent = text[a:b].strip()
        if i == min(idx):
            parts.append(new)
        elif i not in idx and sent:
            parts.append(sent)
    return " ".join(parts)


def one_edit(text: str, kind: str) -> str | None:
    """The one-error edit of ``kind`` (e.g. "laterality_swap") that training uses for a report, or
    None. Seeded by the text itself (a str seed is hashed with SHA-512, not the salted hash()), so
    every rank, rerun and evaluation picks the same edit: the cache's edit columns and CXR-Align's
    seen family are the same strings."""
    import random

    rng = random.Random(f"{kind}:{text}")
    return next((v.text for v in one_error_edits(text, rng) if v.kind == kind), None)


def _edit_candidates(text: str, result: LabelResult, rng) -> list[tuple[Variant, str | None]]:
    out: list[tuple[Variant, str | None]] = []
    by_obs: dict[str, list[Mention]] = {}
    for m in result.mentions:
        if m.observation != "No Finding":
            by_obs.setdefault(m.observation, []).append(m)
    # negation flip of one observation (all its mentions, so the vector changes in one place)
    for obs in _shuffled(rng, sorted(by_obs)):
        ms = [m for m in by_obs[obs] if m.status != "uncertain"]
        if not ms or len(ms) != len(by_obs[obs]):
            continue
        edits = _flip_edits(text, ms)
        templated = template_flip(text, result.mentions, obs, rng) if _randint(rng, 2) else None
        if edits or templated:
            before = result.vector.get(obs)
            after = "negative" if before == 1 else "positive"
            out.append(
                (
                    Variant(
                        templated or _apply(text, edits),
                        "negation_flip",
                        f"{obs}: {'positive' if before == 1 else 'negative'} -> {after}",
                    ),
                    obs,
                )
            )
            break
    positives = [
        m for m in result.mentions if m.status == "positive" and m.observation != "No Finding"
    ]
    for m in _shuffled(rng, positives):
        if m.laterality:
            hit = _nearest(_LATERALITY_WORD, text, m, 60, 40)
            if hit is not None:
                w = hit.group(1).lower()
                new = {"left": "right", "right": "left"}.get(w, _choice(rng, ["left", "right"]))
                if LATERALITY.get(w) == new:
                    continue
                t2 = text[: hit.start()] + _match_case(new, hit.group(1)) + text[hit.end() :]
                out.append(
                    (
                        Variant(t2, "laterality_swap", f"{m.observation} laterality: {w} -> {new}"),
                        m.observation,
                    )
                )
                break
    for m in _shuffled(rng, positives):
        if m.severity:
            hit = _nearest(_SEVERITY_WORD, text, m, 30, 0)
            if hit is not None and hit.group(1).lower() in _SEVERITY_SWAP:
                w = hit.group(1).lower()
                t2 = (
                    text[: hit.start()]
                    + _match_case(_SEVERITY_SWAP[w], hit.group(1))
                    + text[hit.end() :]
                )
                out.append(
                    (
                        Variant(
                            t2,
                            "severity_change",
                            f"{m.observation} severity: {w} -> {_SEVERITY_SWAP[w]}",
                        ),
                        m.observation,
                    )
                )
                break
    for m in _shuffled(rng, positives):
        if m.measurement:
            hit = _nearest(_MEASURE, text, m, 40, 40)
            if hit is not None:
                value = float(hit.group(1))
                new = value * 2 if value < 5 else value / 2
                new_s = f"{new:.1f}".rstrip("0").rstrip(".")
                t2 = text[: hit.start()] + new_s + hit.group(2) + text[hit.end() :]
                out.append(
                    (
                        Variant(
                            t2,
                            "measurement_change",
                            f"{m.observation} measurement: {hit.group(1)} -> {new_s}",
                        ),
                        m.observation,
                    )
                )
                break
    if result.vector.get("Support Devices") != 1:
        sentence = _choice(rng, lx.DEVICE_SENTENCES)
        t2 = text.rstrip()
        t2 = (t2 + ("" if t2.endswith((".", "!", "?")) else ".") + " " + sentence).strip()
        out.append((Variant(t2, "device_add", f"added: {sentence}"), "Support Devices"))
    else:
        sents = _sentences(text)
        dev_sents = {m.sentence_index for m in by_obs.get("Support Devices", [])}
        other = {m.sentence_index for m in result.mentions if m.observation != "Support Devices"}
        if dev_sents and not dev_sents & other:
            keep = [text[a:b].strip() for i, (a, b) in enumerate(sents) if i not in dev_sents]
            out.append(
                (
                    Variant(
                        " ".join(s for s in keep if s),
                        "device_remove",
                        "removed the device sentences",
                    ),
                    "Support Devices",
                )
            )
    for m in _shuffled(rng, positives):
        if m.form != "term":
            continue
        word = text[m.span[0] : m.span[1]]
        new = lx.NEIGHBOURS.get(word.lower())
        if new is None:
            continue
        t2 = re.sub(
            rf"\b{re.escape(word)}\b",
            lambda h, new=new: _match_case(new, h.group()),
            text,
            flags=re.IGNORECASE,
        )
        target = _LABELER.label(new).mentions
        if target:
            out.append(
                (Variant(t2, "finding_swap", f"{word.lower()} -> {new}"), target[0].observation)
            )
            break
    return out


def one_error_edits(text: str, rng) -> list[Variant]:
    """Versions of ``text`` with exactly one clinical fact changed, each confirmed by the Labeler."""
    if not isinstance(text, str) or not text.strip():
        return []
    result = _LABELER.label(text)
    if not result.mentions:
        return []
    before = summarise(result)
    kept = []
    for variant, target in _edit_candidates(text, result, rng):
        after = summarise(_LABELER.label(variant.text))
        if confirm_edit(variant.kind, before, after, target):
            kept.append(variant)
    return kept
