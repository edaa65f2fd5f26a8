"""One-error edits of a report: versions with exactly one clinical fact changed.

``one_error_edits``: negation flip (in place, or the finding's sentences as one template
sentence with varied cue words), laterality swap, severity change, device added / removed,
measurement change, finding replaced by a neighbour. An edit is kept only if the Labeler sees
exactly that one change (``facts.confirm_edit``); unconfirmed edits are discarded.
"""

from __future__ import annotations

import re

from llmclip.clinical import lexicon as lx
from llmclip.clinical.facts import confirm_edit, summarise
from llmclip.clinical.labeler import Labeler, LabelResult, Mention
from llmclip.clinical.lexicon import LATERALITY, SEVERITY
from llmclip.clinical.negation import _apply, _flip_edits
from llmclip.clinical.patterns import _sentences
from llmclip.clinical.variants import Variant, _choice, _randint, _shuffled

_LABELER = Labeler()

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
